"""``python -m hypernet evaluate`` against broken files and hostile judges: always one line and exit 2,
never a traceback, and no part of the key in anything it prints or writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hypernet.cli import main
from tests.support.fake_judge import FakeJudge, key_stretches

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-cli-hostile-9d4e2a7b6c1f"


def windows(text: str) -> list[str]:
    return key_stretches(text, KEY)


@pytest.fixture
def folders(tmp_path):
    """One pair, dog__ink, of one image with one subject and one style reference: two questions per run."""
    for path in ("generated/dog__ink/a.png", "subjects/dog/0.png", "styles/ink/0.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / path)
    return tmp_path


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)


def _args(folders, url, *extra, out=None):
    return ["evaluate", "--generated", str(folders / "generated"), "--subjects", str(folders / "subjects"),
            "--styles", str(folders / "styles"), "--out", str(out or folders / "out"), "--judge-url", url,
            "--judge-model", "critic", "--retries", "0", "--timeout", "2", *extra]


def _cli(args, env_key=KEY):
    """The real entry point in a subprocess: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORARAR_JUDGE_API_KEY": env_key}
    env.pop("LORARAR_JUDGE_URL", None)
    done = subprocess.run([sys.executable, "-m", "hypernet", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def _one_line_error(code, stderr, *names):
    assert code == 2 and "Traceback" not in stderr, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and all(name in line for name in names), line
    return line


@pytest.mark.parametrize("content, why", [
    ("{not json", "not readable JSON"),
    (b"\xff\xfe\x00garbage", "not readable JSON"),
    ("[1, 2]", "expected a JSON object with an 'images' object"),
    ('{"version": 1, "images": []}', "expected a JSON object with an 'images' object"),
    ('{"version": 1, "images": {"dog__ink/a.png": 5}}', "record 'dog__ink/a.png' is not a result"),
    ('{"version": 1, "images": {"k": {"image": "a.png", "subject": {"verdicts": "yes"}, "style": {}}}}', "record 'k'"),
    ('{"version": 1, "images": {"k": {"image": "a.png", "subject": {"verdicts": ["yes"]}, '
     '"style": {"verdicts": [{}]}, "fingerprint": "f"}}}', "record 'k'"),
    ("[" * 100000, "nested too deeply"),
])
def test_a_corrupt_results_file_stops_resuming_with_one_line(folders, capsys, content, why):
    results = folders / "out" / "results.json"
    results.parent.mkdir()
    results.write_bytes(content if isinstance(content, bytes) else content.encode())
    with FakeJudge() as server:
        code = main(_args(folders, server.base_url))
        _one_line_error(code, capsys.readouterr().err, str(results), why, "delete it or pass --restart")
        assert server.raw_bytes == []  # stopped before asking anything
        assert main(_args(folders, server.base_url, "--restart")) == 0


def test_a_corrupt_results_file_is_one_line_through_the_real_entry_point(folders):
    results = folders / "out" / "results.json"
    results.parent.mkdir()
    results.write_text("[" * 100000)
    code, _, stderr = _cli(_args(folders, "http://127.0.0.1:9/v1"))
    _one_line_error(code, stderr, str(results), "nested too deeply")


def test_out_must_be_a_folder_it_can_make(folders, capsys):
    (folders / "file.txt").write_text("not a folder")
    with FakeJudge() as server:
        assert main(_args(folders, server.base_url, out=folders / "file.txt")) == 2
        assert "file.txt: is a file, not a folder" in capsys.readouterr().err
        code, _, stderr = _cli(_args(folders, server.base_url, out=folders / "file.txt" / "sub"))
        _one_line_error(code, stderr, str(folders / "file.txt" / "sub"), "cannot create the output folder")
        (folders / "out" / "results.csv").mkdir(parents=True)
        assert main(_args(folders, server.base_url)) == 2
        assert "results.csv: is a folder" in capsys.readouterr().err
    assert server.raw_bytes == [] and (folders / "file.txt").read_text() == "not a folder"


def test_a_key_a_header_cannot_carry_is_refused_unseen(folders):
    with FakeJudge() as server:
        code, stdout, stderr = _cli(_args(folders, server.base_url), env_key=KEY + "\r\nX-Injected: yes")
    _one_line_error(code, stderr, "$LORARAR_JUDGE_API_KEY holds characters an HTTP header cannot carry")
    assert not windows(stdout + stderr) and server.raw_bytes == []


def test_a_remote_judge_gets_no_key_unless_the_operator_listed_it(folders, monkeypatch):
    code, stdout, stderr = _cli(_args(folders, "https://judge.example.com/v1"))
    _one_line_error(code, stderr, "judge https://judge.example.com/v1/chat/completions: refusing to send the API key")
    assert not windows(stdout + stderr)
    monkeypatch.setenv("LORARAR_JUDGE_URL", "https://judge.example.com/v1")  # listed: allowed (then unreachable)
    from hypernet.judge import ChatCompletionsJudge
    ChatCompletionsJudge("https://judge.example.com/v1", "critic")


@pytest.mark.parametrize("action, expected", [
    ("drip", "no answer within 2 s"), ("hang", "no answer within 2 s"), ("huge", "refused an answer over"),
    ("huge_chunked", "refused an answer over"), ("401", "HTTP 401"), ("echo_escaped", "HTTP 400"),
    ("echo_reason", "HTTP 500"), ("echo_status", "BadStatusLine"), ("echo_header", "HTTP 401"),
    ("badjson", "answer is not a chat completion"),
])
def test_hostile_judges_give_one_line_and_no_key(folders, capsys, action, expected):
    with FakeJudge(default=action, drip_s=0.5) as server:
        assert main(_args(folders, server.base_url)) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert expected in line and server.base_url in line
    written = "".join(p.read_bytes().decode("latin-1") for p in (folders / "out").iterdir())
    assert not windows(out + err + written)


def test_answers_echoing_the_key_or_malformed_are_stored_without_it(folders, capsys):
    script = ["echo", "echo_part", "nested", "object", "number", "parts", "nested_body"]
    outputs = []
    for first, second in zip(script, script[1:] + ["echo"]):
        with FakeJudge([first, second]) as server:
            if first == "echo":  # once through the real entry point, the rest in-process
                code, stdout, stderr = _cli(_args(folders, server.base_url, "--restart"))
            else:
                code = main(_args(folders, server.base_url, "--restart"))
                stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        outputs += [stdout, stderr, *((folders / "out" / name).read_bytes().decode("latin-1")
                                      for name in ("results.json", "results.csv", "pairs.csv"))]
        saved = json.loads((folders / "out" / "results.json").read_text())["images"]["dog__ink/a.png"]
        verdicts = saved["subject"]["verdicts"] + saved["style"]["verdicts"]
        expected = [("yes" if action.startswith("echo") else "unparsed") for action in (first, second)]
        assert verdicts == expected, (first, second, saved)
    assert not windows("".join(outputs))
