"""``python -m hypernet evaluate`` over folders, against real HTTP judges on 127.0.0.1 (tests/support/fake_judge.py).

- A batch: votes counted, aggregated per pair then over pairs, the reports written, an interrupted run resumed,
  the key sent only in the judge's Authorization header (two real processes: the entry point itself).
- Broken files and hostile judges: always one line and exit 2, never a traceback, and no part of the key in
  anything it prints or writes. The refusals that only check their one line run through the command's own entry
  function in this process (tests/support/cli.py), the same function ``python -m hypernet`` calls on the pack
  imported the same single way; a results file that could hang a read (a FIFO, /dev/zero) is read in a real process,
  which a hang fails at its timeout.
"""

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hypernet.cli import main
from tests.support.cli import run_in_process
from tests.support.fake_judge import FakeJudge, key_stretches

REPO = Path(__file__).resolve().parents[2]
LIVE_KEY = "sk-live-do-not-leak-7f3a9c"  # the batch tests' key
KEY = "sk-cli-hostile-9d4e2a7b6c1f"  # the hostile tests' key, in $LORARAR_JUDGE_API_KEY through their folders fixture
RED, BLUE, ODD = (255, 0, 0), (0, 0, 255), (255, 77, 0)


def _save(path: Path, colour, size=(700, 350)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def batch(tmp_path):
    """dog8 x watercolor_painting3 (3 images, 3 subject refs, 2 style refs), cat2 x glowing (2 images, 2 + 1 refs)."""
    for i in range(3):
        _save(tmp_path / "subjects" / "dog8" / f"{i:02d}.jpg", (90, 60, 30), (600, 800))
    for i in range(2):
        _save(tmp_path / "subjects" / "cat2" / f"{i:02d}.png", (20, 20, 20))
        _save(tmp_path / "styles" / "watercolor_painting3" / f"{i}.png", (200, 220, 250))
    _save(tmp_path / "styles" / "glowing" / "0.webp", (250, 250, 0))
    gen = tmp_path / "generated"
    _save(gen / "dog8__watercolor_painting3" / "a.png", RED)
    _save(gen / "dog8__watercolor_painting3" / "b.png", BLUE)
    _save(gen / "dog8__watercolor_painting3" / "c.png", ODD)
    _save(gen / "cat2__glowing" / "d.png", RED)
    _save(gen / "cat2__glowing" / "e.png", RED)
    return tmp_path


def _decode(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def _first_pixel(request):
    return _decode(request.image_urls[0]).getpixel((0, 0))


def answer(request) -> str:
    """Subject: yes, except 'malformed' for the ODD image. Style: yes for red-ish images, no for blue."""
    colour = _first_pixel(request)
    if "same subject" in request.question:
        return "malformed" if colour == ODD else "Yes, it is."
    return "yes" if colour[0] > 128 else "No."


def _batch_args(batch, server, *extra):
    return ["evaluate", "--generated", str(batch / "generated"), "--subjects", str(batch / "subjects"),
            "--styles", str(batch / "styles"), "--out", str(batch / "out"), "--judge-url", server.base_url,
            "--judge-model", "llava-critic-7b", "--retries", "0", *extra]


def test_batch_counts_votes_aggregates_and_writes_reports(batch, capsys):
    with FakeJudge(responder=answer) as server:
        assert main(_batch_args(batch, server)) == 0
    # cat2__glowing: 2 images x (2 + 1) refs; dog8__watercolor_painting3: 3 x (3 + 2)
    assert len(server.requests) == 2 * 3 + 3 * 5
    style_questions = [q for q in server.questions if "same subject" not in q]
    assert sum("watercolor painting style" in q for q in style_questions) == 6
    assert sum("glowing style" in q for q in style_questions) == 2
    sizes = {_decode(url).size for r in server.requests for url in r.image_urls}
    assert sizes == {(512, 256), (384, 512)}  # every picture sent at most 512 px on the long side

    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "__" in line.split(" ")[0] or line.startswith("mean")}
    assert rows["cat2__glowing"] == ["2", "100.0", "100.0", "100.0"]
    assert rows["dog8__watercolor_painting3"] == ["3", "66.7", "66.7", "33.3"]
    assert rows["mean"] == ["5", "83.3", "83.3", "66.7"]  # mean over pairs, not over images
    assert "unparsed answers: 3" in out and "asked 21 questions about 5 images" in out

    report = json.loads((batch / "out" / "results.json").read_text())
    c = report["images"]["dog8__watercolor_painting3/c.png"]
    assert c["subject"]["unparsed"] == 3 and c["subject"]["no"] == 0 and not c["subject"]["pass"] and c["style"]["pass"]
    assert report["mean"]["both"] == pytest.approx(2 / 3, abs=1e-6)
    with open(batch / "out" / "results.csv") as handle:
        image_rows = list(csv.DictReader(handle))
    assert [(r["pair"], r["image"], r["both"]) for r in image_rows][:3] == [
        ("cat2__glowing", "d.png", "1"), ("cat2__glowing", "e.png", "1"), ("dog8__watercolor_painting3", "a.png", "1")]
    with open(batch / "out" / "pairs.csv") as handle:
        assert list(csv.DictReader(handle))[-1] == {"pair": "mean", "images": "5", "subject_pct": "83.33",
                                                     "style_pct": "83.33", "both_pct": "66.67", "unparsed": "3"}
    with Image.open(batch / "out" / "summary.png") as chart:
        assert chart.format == "PNG" and chart.width > 300
    assert sorted(os.listdir(batch / "out")) == ["pairs.csv", "results.csv", "results.json", "summary.png"]


def test_interrupted_run_resumes_without_asking_finished_images_again(batch, capsys):
    # the judge fails for good at the 8th question: cat2's two images (6 questions) are finished, dog8/a is not
    with FakeJudge(["yes"] * 7, default="500") as failing:
        assert main(_batch_args(batch, failing)) == 2
    assert "unreachable after 1 attempt: HTTP 500" in capsys.readouterr().err
    saved = json.loads((batch / "out" / "results.json").read_text())
    assert sorted(saved["images"]) == ["cat2__glowing/d.png", "cat2__glowing/e.png"]

    with FakeJudge(responder=answer) as server:
        assert main(_batch_args(batch, server)) == 0
    assert len(server.requests) == 3 * 5  # only dog8's images
    assert not [q for q in server.questions if "glowing" in q]
    assert "asked 15 questions about 3 images (2 taken from earlier runs)" in capsys.readouterr().out

    with FakeJudge(responder=answer) as server:  # all finished: nothing asked, same numbers
        assert main(_batch_args(batch, server)) == 0
    assert server.requests == [] and "asked 0 questions about 0 images" in capsys.readouterr().out

    _save(batch / "styles" / "glowing" / "0.webp", (0, 250, 250))  # a changed reference: that pair again
    with FakeJudge(responder=answer) as server:
        assert main(_batch_args(batch, server)) == 0
    assert len(server.requests) == 2 * 3

    with FakeJudge(responder=answer) as server:
        assert main(_batch_args(batch, server, "--restart")) == 0
    assert len(server.requests) == 21


def test_style_name_mapping_file(batch):
    names = batch / "names.json"
    names.write_text(json.dumps({"glowing": "neon glow"}))
    with FakeJudge() as server:
        assert main(_batch_args(batch, server, "--style-names", str(names))) == 0
    assert sum("neon glow style" in q for q in server.questions) == 2


def test_key_never_leaks_into_output_or_files(batch):
    """Through the real entry point: the key reaches the judge's Authorization header and nothing else."""
    env = {**os.environ, "LORARAR_JUDGE_API_KEY": LIVE_KEY, "PYTHONPATH": str(REPO)}
    env.pop("LORARAR_JUDGE_URL", None)
    with FakeJudge(responder=answer) as server:
        ok = subprocess.run([sys.executable, "-m", "hypernet", *_batch_args(batch, server)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {LIVE_KEY}"}
    with FakeJudge(default="401") as refusing:  # a server that echoes the key in its error body
        refused = subprocess.run([sys.executable, "-m", "hypernet", *_batch_args(batch, refusing, "--restart")], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    outputs = [ok.stdout, ok.stderr, refused.stdout, refused.stderr]
    outputs += [p.read_bytes().decode("latin-1") for p in (batch / "out").iterdir()]
    assert not [text for text in outputs if LIVE_KEY in text]


def test_key_rules_apply_to_the_cli(batch, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LIVE_KEY)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", LIVE_KEY)
    with FakeJudge() as server, FakeJudge() as pinned:
        assert main(_batch_args(batch, server, "--api-key-env", "AWS_SECRET_ACCESS_KEY")) == 2
        assert "starting with LORARAR_" in capsys.readouterr().err
        monkeypatch.setenv("LORARAR_JUDGE_URL", pinned.base_url)
        assert main(_batch_args(batch, server)) == 2
        err = capsys.readouterr().err
        assert "refusing to send the API key" in err and len(err.strip().splitlines()) == 1 and LIVE_KEY not in err
    assert server.raw_bytes == [] and pinned.raw_bytes == []

# ------------------------------------------------------------------ broken files and hostile judges

def windows(text: str) -> list[str]:
    return key_stretches(text, KEY)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """One pair, dog__ink, of one image with one subject and one style reference: two questions per run; KEY in
    $LORARAR_JUDGE_API_KEY and no operator list of judges (the key may go to a loopback judge only)."""
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    for path in ("generated/dog__ink/a.png", "subjects/dog/0.png", "styles/ink/0.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / path)
    return tmp_path


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


def _cli_in_process(args, env_key=KEY):
    """_cli's command through the same entry function, in this process (tests/support/cli.py): for the refusals that
    only check one line, a torch import shorter each than a real process. (exit code, stdout, stderr)"""
    done = run_in_process(*args, env={"LORARAR_JUDGE_API_KEY": env_key, "LORARAR_JUDGE_URL": None})
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
        code, stdout, stderr = _cli_in_process(_args(folders, server.base_url), env_key=KEY + "\r\nX-Injected: yes")
    _one_line_error(code, stderr, "$LORARAR_JUDGE_API_KEY holds characters an HTTP header cannot carry")
    assert not windows(stdout + stderr) and server.raw_bytes == []


def test_a_remote_judge_gets_no_key_unless_the_operator_listed_it(folders, monkeypatch):
    code, stdout, stderr = _cli_in_process(_args(folders, "https://judge.example.com/v1"))
    _one_line_error(code, stderr, "judge https://judge.example.com/v1/chat/completions: refusing to send the API key")
    assert not windows(stdout + stderr)
    monkeypatch.setenv("LORARAR_JUDGE_URL", "https://judge.example.com/v1")  # listed: allowed (then unreachable)
    from hypernet.evaluation.judge import ChatCompletionsJudge
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


# ------------------------------------------------------------------ a corrupt results.json, strictly

def _saved_with(folders, server, field_text):
    """results.json of a finished run with ``"clip_i_subject": <field_text>`` written into its record as is."""
    assert main(_args(folders, server.base_url)) == 0
    results = folders / "out" / "results.json"
    saved = json.loads(results.read_text())
    saved["images"]["dog__ink/a.png"]["clip_i_subject"] = "@FIELD@"
    results.write_text(json.dumps(saved).replace('"@FIELD@"', field_text))
    return results


@pytest.mark.parametrize("field_text, why", [
    ("1" + "0" * 400, "record 'dog__ink/a.png' is not a result"),  # 10**400: overflowed the mean
    ("1e400", "record 'dog__ink/a.png' is not a result"),  # parsed as inf
    ("5.0", "record 'dog__ink/a.png' is not a result"),  # not a cosine
    ("true", "record 'dog__ink/a.png' is not a result"),
    ("NaN", "NaN is not standard JSON"),
    ("Infinity", "Infinity is not standard JSON"),
    ("-Infinity", "-Infinity is not standard JSON"),
    ("1" * 5000, "not readable JSON"),  # over Python's digit limit for int()
])
def test_a_results_file_with_numbers_this_tool_never_writes_is_refused(folders, capsys, field_text, why):
    with FakeJudge() as server:
        results = _saved_with(folders, server, field_text)
        capsys.readouterr()
        before = results.read_bytes()
        asked = len(server.requests)
        code = main(_args(folders, server.base_url))
        _one_line_error(code, capsys.readouterr().err, str(results), why, "delete it or pass --restart")
        assert len(server.requests) == asked and results.read_bytes() == before


def test_a_resumed_record_is_written_back_as_checked_standard_json(folders, capsys):
    with FakeJudge() as server:
        results = _saved_with(folders, server, '0.5, "junk": {"deep": [1, 2, 3]}')
        assert main(_args(folders, server.base_url)) == 0
        assert len(server.requests) == 2  # the first run's two questions; the resumed image was not asked again
    record = json.loads(results.read_text())["images"]["dog__ink/a.png"]
    assert record["clip_i_subject"] == 0.5 and "junk" not in record


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder", "oversized"])
def test_a_results_file_that_is_not_a_small_regular_file_is_refused_quickly(folders, kind, monkeypatch):
    results = folders / "out" / "results.json"
    results.parent.mkdir()
    if kind == "dev_zero":
        results.symlink_to("/dev/zero")  # read whole, it filled the memory
    elif kind == "fifo":
        os.mkfifo(results)  # read, it hung the run
    elif kind == "folder":
        results.mkdir()
    else:
        monkeypatch.setattr("hypernet.evaluation.batch.MAX_STATE_BYTES", 1024)
        results.write_text('{"version": 1, "images": {}, "pad": "' + "x" * 2048 + '"}')
    if kind == "oversized":  # in-process: the lowered cap holds only here
        with FakeJudge() as server:
            assert main(_args(folders, server.base_url)) == 2
        return
    code, _, stderr = _cli(_args(folders, "http://127.0.0.1:9/v1"))  # subprocess: a hang fails at its timeout
    expected = "is a folder" if kind == "folder" else "not a regular file"
    _one_line_error(code, stderr, str(results), expected)


# ------------------------------------------------------------------ other files and options

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG claiming width x height pixels in a few dozen bytes: a decompression bomb for Image.open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line(folders):
    bomb = folders / "generated" / "dog__ink" / "a.png"
    _png_header_only(bomb, 40000, 40000)
    with FakeJudge() as server:
        code, _, stderr = _cli_in_process(_args(folders, server.base_url))
    _one_line_error(code, stderr, str(bomb), "cannot read the image (DecompressionBombError")
    assert server.raw_bytes == []


def test_an_image_name_that_is_not_utf8_is_refused_before_asking(folders):
    odd = folders / "generated" / "dog__ink" / os.fsdecode(b"b\xff.png")
    Image.new("RGB", (16, 16)).save(odd, format="PNG")
    with FakeJudge() as server:
        code, stdout, stderr = _cli_in_process(_args(folders, server.base_url))
    _one_line_error(code, stderr, "b\\udcff.png", "is not valid UTF-8; rename it")
    assert server.raw_bytes == [] and not (folders / "out" / "results.json").exists()


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "oversized"])
def test_style_names_must_be_a_small_regular_file(folders, kind):
    names = folders / "names.json"
    if kind == "dev_zero":
        names.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(names)
    else:
        names.write_text('{"ink": "' + "x" * (1024 * 1024) + '"}')
    code, _, stderr = _cli(_args(folders, "http://127.0.0.1:9/v1", "--style-names", str(names)))
    _one_line_error(code, stderr, str(names), "cannot read the style-name mapping",
                    "larger than 1 MiB" if kind == "oversized" else "not a regular file")


@pytest.mark.parametrize("option, value, expected", [
    ("--timeout", "1e300", "timeout must be a positive number of seconds, at most 3600"),
    ("--timeout", "nan", "timeout must be a positive number of seconds"),
    ("--timeout", "0", "timeout must be a positive number of seconds"),
    ("--retries", "-1", "retries must be a whole number from 0 to 10"),
    ("--retries", "1000000", "retries must be a whole number from 0 to 10"),
])
def test_timeout_and_retries_out_of_range_are_refused_up_front(folders, option, value, expected):
    args = _args(folders, "http://127.0.0.1:9/v1")
    args[args.index(option) + 1] = value
    code, _, stderr = _cli_in_process(args)
    _one_line_error(code, stderr, expected)


@pytest.mark.parametrize("url", ["http://[::ffff:127.0.0.1]/v1", "http://[::1%25lo]/v1", "http://[::1]/v1",
                                 "https://[::1:50]/v1"])
def test_ipv6_urls_are_one_line_errors_never_tracebacks(folders, url):
    code, _, stderr = _cli_in_process(_args(folders, url, "--timeout", "1"), env_key="")
    line = _one_line_error(code, stderr)
    assert url.removesuffix("/v1") in line
