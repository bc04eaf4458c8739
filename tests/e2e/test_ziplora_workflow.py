"""The ZipLoRA example workflow on a real server: it optimises (a few steps), samples and saves; an interrupt during
the optimisation errors that prompt only, and the next prompt runs."""

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import STYLE, SUBJECT
from devkit.synthetic_models import CHECKPOINT_NAME
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "lorarar_ziplora_optimise.json"
# 128 px references: 16 x 16 latents, the smallest the synthetic UNet takes
REFERENCES = {"lorarar_subject_1.png": (200, 60, 60), "lorarar_style_1.png": (60, 60, 200)}


def for_this_machine(prompt: dict, steps: int, seed: int = 0) -> dict:
    """The synthetic model and test LoRAs, a few optimisation steps, 32 x 32 px sampling in one step."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        elif kind == "LoraRarZipLora":
            inputs.update(subject_lora=SUBJECT, style_lora=STYLE, steps=steps, seed=seed)
        elif kind == "EmptyLatentImage":
            inputs.update(width=32, height=32)
        elif kind == "KSampler":
            inputs.update(steps=1, sampler_name="euler", scheduler="normal")
    return prompt


def execution_error(entry: dict) -> str:
    """The error message and the server's traceback, so a failure says where."""
    return " ".join(m[1].get("exception_message", "") + "\n" + "".join(m[1].get("traceback", []))
                    for m in entry["status"]["messages"] if m[0] == "execution_error")


def texts(entry: dict) -> list[str]:
    return [text for output in entry["outputs"].values() for text in output.get("text", [])]


@pytest.fixture(scope="module")
def ziplora_prompt(pack_server):
    server, _ = pack_server
    for name, colour in REFERENCES.items():
        Image.new("RGB", (128, 128), colour).save(server.input_dir / name)
    return ui_to_api(json.loads(WORKFLOW.read_text()), server.object_info())


def test_the_example_optimises_samples_and_saves(pack_server, ziplora_prompt):
    server, loras = pack_server
    prompt = for_this_machine(json.loads(json.dumps(ziplora_prompt)), steps=2)
    entry = server.wait(server.queue_prompt(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (report,) = [t for t in texts(entry) if t.startswith("LoRA.rar ZipLoRA")]
    assert "2 of 2 steps" in report and "loss on a fixed evaluation batch at end" in report
    (saved,) = [Path(t) for t in texts(entry) if t.endswith(".safetensors")]
    assert saved.is_file() and saved.parent.parent == loras
    saved.unlink()
    images = server.output_files(entry)
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in images)  # the sample and the loss curve
    curves = [p for p in images if Image.open(p).width >= 600]
    assert curves, images


def test_an_interrupt_during_optimisation_stops_that_prompt_and_the_next_runs(pack_server, ziplora_prompt):
    server, _ = pack_server
    prompt = for_this_machine(json.loads(json.dumps(ziplora_prompt)), steps=200, seed=5)
    prompt_id = server.queue_prompt(prompt)
    stop = threading.Event()

    def interrupt_while_optimising():
        """The loaders' outputs are cached from the test before, so the ZipLoRA node is the first to run; a few
        seconds in, it is optimising (200 steps take minutes here)."""
        while not stop.is_set():
            queue = server.get("/queue")
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                time.sleep(5)
                server._request("POST", "/interrupt", {})
            time.sleep(0.3)

    worker = threading.Thread(target=interrupt_while_optimising, daemon=True)
    worker.start()
    try:
        entry = server.wait(prompt_id, timeout=600)
    finally:
        stop.set()
        worker.join()
    assert entry["status"]["status_str"] == "error"
    (interrupted,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted["node_type"] == "LoraRarZipLora", interrupted

    after = for_this_machine(json.loads(json.dumps(ziplora_prompt)), steps=1, seed=6)
    entry = server.wait(server.queue_prompt(after), timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    for path in (Path(t) for t in texts(entry) if t.endswith(".safetensors")):
        path.unlink()
