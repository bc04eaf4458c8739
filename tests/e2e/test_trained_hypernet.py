"""A hypernet trained by ``python -m hypernet train`` (two steps on devkit's synthetic dataset through the synthetic
SD 1.5 checkpoint, a real subprocess), on a real server: it is listed by the Hypernet Loader, merges two SD 1.5 LoRAs with method lorarar on the synthetic SD 1.5
checkpoint (the report says what it was trained for), is refused in one line naming the file and both families on
the SDXL-family model, and the server runs the next prompt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import STYLE, SUBJECT
from devkit import synthetic_models
from devkit.loras import random_lora, write_lora
from devkit.training_data import build_dataset, sd15_layout
from devkit.workflows import ui_to_api
from hypernet import __version__

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
HYPERNET = "e2e_sd15_trained.safetensors"
SD15_SUBJECT, SD15_STYLE = "e2e_sd15_dataset_subject.safetensors", "e2e_sd15_dataset_style.safetensors"


@pytest.fixture(scope="module")
def trained(pack_server, hypernet_folder, tmp_path_factory):
    """The synthetic SD 1.5 checkpoint, two SD 1.5 LoRAs, and an SD 1.5 hypernet trained by the CLI into the server's
    lorarar folder (2 steps, 128 px: what matters here is the file it writes)."""
    server, loras = pack_server
    models = synthetic_models.ensure_sd15_model(synthetic_models.default_dir())
    layout = sd15_layout()
    write_lora(loras / SD15_SUBJECT, random_lora(layout, rank=4, seed=201, alpha=4.0, std=0.05))
    write_lora(loras / SD15_STYLE, random_lora(layout, rank=8, seed=202, fmt="kohya-diffusers", std=0.05))
    dataset = build_dataset(tmp_path_factory.mktemp("sd15") / "data", layout, images=1, image_size=128)
    base = Path(models) / "checkpoints" / synthetic_models.SD15_CHECKPOINT_NAME
    command = [sys.executable, "-m", "hypernet", "train", "--dataset", str(dataset), "--base", str(base),
               "--out", str(hypernet_folder / HYPERNET), "--overwrite", "--resolution", "128", "--epochs", "2",
               "--steps-per-pair", "1", "--validate-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return server


def merge_prompt(server, checkpoint: str, subject: str, style: str, **merge_inputs) -> dict:
    """The merge-and-save example without its save node: checkpoint -> loader (HYPERNET) -> merge -> report."""
    workflow = json.loads((REPO / "example_workflows" / "lorarar_merge_and_save_lora.json").read_text())
    prompt = ui_to_api(workflow, server.object_info())
    for node_id, node in list(prompt.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoraRarSaveMergedLora":
            del prompt[node_id]
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        elif kind == "LoraRarHypernetLoader":
            inputs["hypernet"] = HYPERNET
        elif kind == "LoraRarMerge":
            inputs.update(subject_lora=subject, style_lora=style, method="lorarar", **merge_inputs)
    return prompt


def run(server, prompt) -> dict:
    return server.wait(server.queue_prompt(prompt), timeout=600)


def error_of(entry: dict) -> str:
    return " ".join(m[1].get("exception_message", "") for m in entry["status"]["messages"] if m[0] == "execution_error")


def report_of(entry: dict) -> str:
    (report,) = [t for out in entry["outputs"].values() for t in out.get("text", []) if "LoRA.rar merge" in t]
    return report


def test_the_trained_file_is_listed_merges_sd15_is_refused_on_another_family_and_the_server_goes_on(trained):
    server = trained
    choices = server.object_info("LoraRarHypernetLoader")["LoraRarHypernetLoader"]["input"]["required"]["hypernet"][0]
    assert HYPERNET in choices

    sd15 = merge_prompt(server, synthetic_models.SD15_CHECKPOINT_NAME, SD15_SUBJECT, SD15_STYLE)
    entry = run(server, sd15)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    report = report_of(entry)
    attention = len(sd15_layout().attention_linears())  # 24: to_q and to_out.0 by the hypernet, to_k/to_v summed
    assert f"hypernet {attention // 2}," in report and f"applied to the model: {attention} layers" in report
    (line,) = [t for t in report.splitlines() if t.startswith(f"hypernet {HYPERNET}:")]
    for text in ("trained for SD15 models", synthetic_models.SD15_CHECKPOINT_NAME, "320, 640, 1280", "4 pairs",
                 "2 steps", __version__):
        assert text in line, line

    sdxl_family = merge_prompt(server, synthetic_models.CHECKPOINT_NAME, SUBJECT, STYLE)
    entry = run(server, sdxl_family)
    assert entry["status"]["status_str"] == "error"
    message = error_of(entry).strip()
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message
    assert message.startswith(f"{HYPERNET}: this hypernet was trained for SD15 models; this model is "
                              f"{synthetic_models.EXPECTED_MODEL_CLASS}"), message

    again = merge_prompt(server, synthetic_models.SD15_CHECKPOINT_NAME, SD15_SUBJECT, SD15_STYLE,
                         subject_strength=0.5)
    entry = run(server, again)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert f"applied to the model: {attention} layers" in report_of(entry)
