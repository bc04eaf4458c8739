"""``python -m hypernet evaluate`` over folders, against a real HTTP judge on 127.0.0.1."""

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
from tests.support.fake_judge import FakeJudge

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-live-do-not-leak-7f3a9c"
RED, BLUE, ODD = (255, 0, 0), (0, 0, 255), (255, 77, 0)


def _save(path: Path, colour, size=(700, 350)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folders(tmp_path):
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


def _args(folders, server, *extra):
    return ["evaluate", "--generated", str(folders / "generated"), "--subjects", str(folders / "subjects"),
            "--styles", str(folders / "styles"), "--out", str(folders / "out"), "--judge-url", server.base_url,
            "--judge-model", "llava-critic-7b", "--retries", "0", *extra]


def test_batch_counts_votes_aggregates_and_writes_reports(folders, capsys):
    with FakeJudge(responder=answer) as server:
        assert main(_args(folders, server)) == 0
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

    report = json.loads((folders / "out" / "results.json").read_text())
    c = report["images"]["dog8__watercolor_painting3/c.png"]
    assert c["subject"]["unparsed"] == 3 and c["subject"]["no"] == 0 and not c["subject"]["pass"] and c["style"]["pass"]
    assert report["mean"]["both"] == pytest.approx(2 / 3, abs=1e-6)
    with open(folders / "out" / "results.csv") as handle:
        image_rows = list(csv.DictReader(handle))
    assert [(r["pair"], r["image"], r["both"]) for r in image_rows][:3] == [
        ("cat2__glowing", "d.png", "1"), ("cat2__glowing", "e.png", "1"), ("dog8__watercolor_painting3", "a.png", "1")]
    with open(folders / "out" / "pairs.csv") as handle:
        assert list(csv.DictReader(handle))[-1] == {"pair": "mean", "images": "5", "subject_pct": "83.33",
                                                     "style_pct": "83.33", "both_pct": "66.67", "unparsed": "3"}
    with Image.open(folders / "out" / "summary.png") as chart:
        assert chart.format == "PNG" and chart.width > 300
    assert sorted(os.listdir(folders / "out")) == ["pairs.csv", "results.csv", "results.json", "summary.png"]


def test_interrupted_run_resumes_without_asking_finished_images_again(folders, capsys):
    # the judge fails for good at the 8th question: cat2's two images (6 questions) are finished, dog8/a is not
    with FakeJudge(["yes"] * 7, default="500") as failing:
        assert main(_args(folders, failing)) == 2
    assert "unreachable after 1 attempt: HTTP 500" in capsys.readouterr().err
    saved = json.loads((folders / "out" / "results.json").read_text())
    assert sorted(saved["images"]) == ["cat2__glowing/d.png", "cat2__glowing/e.png"]

    with FakeJudge(responder=answer) as server:
        assert main(_args(folders, server)) == 0
    assert len(server.requests) == 3 * 5  # only dog8's images
    assert not [q for q in server.questions if "glowing" in q]
    assert "asked 15 questions about 3 images (2 taken from earlier runs)" in capsys.readouterr().out

    with FakeJudge(responder=answer) as server:  # all finished: nothing asked, same numbers
        assert main(_args(folders, server)) == 0
    assert server.requests == [] and "asked 0 questions about 0 images" in capsys.readouterr().out

    _save(folders / "styles" / "glowing" / "0.webp", (0, 250, 250))  # a changed reference: that pair again
    with FakeJudge(responder=answer) as server:
        assert main(_args(folders, server)) == 0
    assert len(server.requests) == 2 * 3

    with FakeJudge(responder=answer) as server:
        assert main(_args(folders, server, "--restart")) == 0
    assert len(server.requests) == 21


def test_style_name_mapping_file(folders):
    names = folders / "names.json"
    names.write_text(json.dumps({"glowing": "neon glow"}))
    with FakeJudge() as server:
        assert main(_args(folders, server, "--style-names", str(names))) == 0
    assert sum("neon glow style" in q for q in server.questions) == 2


def test_key_never_leaks_into_output_or_files(folders):
    """Through the real entry point: the key reaches the judge's Authorization header and nothing else."""
    env = {**os.environ, "LORARAR_JUDGE_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    env.pop("LORARAR_JUDGE_URL", None)
    with FakeJudge(responder=answer) as server:
        ok = subprocess.run([sys.executable, "-m", "hypernet", *_args(folders, server)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    with FakeJudge(default="401") as refusing:  # a server that echoes the key in its error body
        refused = subprocess.run([sys.executable, "-m", "hypernet", *_args(folders, refusing, "--restart")], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    outputs = [ok.stdout, ok.stderr, refused.stdout, refused.stderr]
    outputs += [p.read_bytes().decode("latin-1") for p in (folders / "out").iterdir()]
    assert not [text for text in outputs if KEY in text]


def test_key_rules_apply_to_the_cli(folders, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    with FakeJudge() as server, FakeJudge() as pinned:
        assert main(_args(folders, server, "--api-key-env", "AWS_SECRET_ACCESS_KEY")) == 2
        assert "starting with LORARAR_" in capsys.readouterr().err
        monkeypatch.setenv("LORARAR_JUDGE_URL", pinned.base_url)
        assert main(_args(folders, server)) == 2
        err = capsys.readouterr().err
        assert "refusing to send the API key" in err and len(err.strip().splitlines()) == 1 and KEY not in err
    assert server.raw_bytes == [] and pinned.raw_bytes == []
