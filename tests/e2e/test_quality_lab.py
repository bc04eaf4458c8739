"""The quality lab's quick mode runs every stage once per suite (bench/quality_lab.py; docs/QUALITY.md), so the lab
cannot rot: the world, judges, VAE, base model and LoRAs trained here, the real ``python -m hypernet train``, every
method through the stock nodes, and the report. Sizes are toys, so no gate and no score is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from quality_lab import BASELINES, METHOD_COLUMNS  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("quality_lab")
    command = [sys.executable, str(REPO / "bench" / "quality_lab.py"), "--quick", "--cache", str(cache)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, f"quality lab failed:\n{first.stdout[-4000:]}\n{first.stderr[-4000:]}"
    return cache, json.loads((cache / "report" / "results.json").read_text())


def test_every_column_is_scored_or_refused_in_one_line(quick_run):
    _, results = quick_run
    assert set(results["scores"]) | set(results["refused"]) == {*BASELINES, *METHOD_COLUMNS}
    assert set(results["refused"]) == {"b-lora"}, results["refused"]  # B-LoRA's block split is SDXL's only
    assert "SD15" in results["refused"]["b-lora"] and "\n" not in results["refused"]["b-lora"]
    for column, scores in results["scores"].items():
        for kind in ("subject", "style", "both"):
            mean, _ = scores[kind]
            assert 0.0 <= mean <= 100.0, (column, kind, mean)
    assert all(seconds >= 0 for seconds in results["merge_seconds"].values())


def test_the_report_holds_the_gates_the_table_and_the_pictures(quick_run):
    cache, results = quick_run
    report = (cache / "report" / "report.md").read_text()
    assert "| column | subject % | style % | both % | merge s |" in report
    gates = list(results["gates"])
    assert gates[:2] == ["shape judge on held-out renders", "style judge on held-out renders"]
    assert any(name.startswith("base model, shape") for name in gates)
    assert sum(name.startswith("LoRA alone: ") for name in gates) == 6  # 2 + 2 training LoRAs, 1 + 1 held out
    assert (cache / "report" / "coefficients.png").is_file()  # the trained hypernet's coefficient picture
    assert (cache / "report" / "base-gate.png").is_file()
    # every scored image where `python -m hypernet evaluate` reads them (the MLLM judge stays an option)
    assert len(list((cache / "report" / "images" / "lorarar").glob("*__*/*.png"))) == results["images_per_pair"]
    assert set(results["merge_reports"]) >= {"direct", "lorarar"}
    grids = list((cache / "report").glob("grid-*.png"))
    assert len(grids) == len(results["pairs"]) == 1


def test_a_rerun_reuses_every_trained_stage(quick_run):
    cache, _ = quick_run
    command = [sys.executable, str(REPO / "bench" / "quality_lab.py"), "--quick", "--cache", str(cache)]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-4000:]
    seconds = json.loads((cache / "report" / "results.json").read_text())["stage_seconds"]
    trained = {"judges", "autoencoder", "encode base set", "base model", "LoRAs", "hypernet training"} & set(seconds)
    assert not trained, f"a rerun trained again: {trained}"
    assert {"base gate", "LoRA gate", "scoring"} <= set(seconds)  # what a rerun does measure again


def test_a_full_run_stops_at_its_first_failed_gate_and_reports_it(tmp_path):
    """Full mode asserts the gates: toy judges (20 steps) fail the first one, so nothing after them is built or
    scored, and the report of what was measured is written before the one-paragraph exit."""
    script = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import quality_lab as q; "
              f"q.run(q.QUICK, False, Path({str(tmp_path)!r}), Path({str(tmp_path / 'report')!r}), 'test')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "the world failed its gates, so no method is scored" in result.stderr
    assert "shape judge on held-out renders:" in result.stderr and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["gate_failures"] and "scores" not in report
    assert not list((tmp_path / "checkpoints").iterdir()), "a stage after the failed gate ran"
