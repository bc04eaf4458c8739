"""Hostile merge and save inputs in API-format prompts sent to a real ComfyUI server over HTTP: each one fails
its prompt with one line naming the file (and layer), nothing is written or replaced, and the server keeps
serving the next prompt."""

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import STYLE, SUBJECT
from tests.e2e.test_example_workflows import execution_error, for_this_machine
from devkit.loras import lora_keys, write_lora
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def merge_and_save(pack_server):
    server, _ = pack_server
    workflow = json.loads((REPO / "example_workflows" / "lorarar_merge_and_save_lora.json").read_text())
    return lambda: for_this_machine(ui_to_api(workflow, server.object_info()))


def _set(prompt: dict, class_type: str, **inputs) -> dict:
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(inputs)
    return prompt


def _fails_with(server, prompt, *expected) -> str:
    entry = server.wait(server.queue_prompt(prompt), timeout=300)
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry).strip()
    assert "\n" not in message and "Traceback" not in message
    for text in expected:
        assert text in message, message
    return message


def _malformed(loras: Path, layout, case: str) -> str:
    module, d_out, d_in = layout.attention_linears()[0]
    up, down, alpha = lora_keys(module, "kohya", layout)
    tensors = {"rank0": {up: torch.zeros(d_out, 0), down: torch.zeros(0, d_in), alpha: torch.tensor(4.0)},
               "int8": {up: torch.ones(d_out, 2, dtype=torch.int8), down: torch.ones(2, d_in, dtype=torch.int8)},
               "alpha_vector": {up: torch.ones(d_out, 2), down: torch.ones(2, d_in), alpha: torch.ones(2)}}[case]
    write_lora(loras / f"e2e_{case}.safetensors", tensors)
    return up.split(".lora_up")[0]


def _files(loras: Path) -> dict[str, bytes]:
    return {str(p.relative_to(loras)): p.read_bytes() for p in loras.rglob("*") if p.is_file()}


def test_hostile_prompts_fail_one_line_and_the_server_keeps_serving(pack_server, merge_and_save, synthetic_layout):
    server, loras = pack_server
    cases = [
        (_set(merge_and_save(), "LoraRarMerge", subject_strength=float("nan")), ["subject strength nan", "finite"]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name="evil\nname"), ["control character U+000A"]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name="evil\r\x00"), ["control character U+000D"]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name="lorarar/"), ["no file name"]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name="x" * 250), ["too long"]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name=SUBJECT, if_exists="overwrite"),
         [f"is the subject LoRA of this merge", SUBJECT]),
        (_set(merge_and_save(), "LoraRarSaveMergedLora", file_name=STYLE, if_exists="overwrite"),
         ["is the style LoRA of this merge"]),
    ]
    for case in ("rank0", "int8", "alpha_vector"):
        layer = _malformed(loras, synthetic_layout, case)
        cases.append((_set(merge_and_save(), "LoraRarMerge", style_lora=f"e2e_{case}.safetensors"),
                      [f"e2e_{case}.safetensors", layer]))
    before = _files(loras)
    for prompt, expected in cases:
        _fails_with(server, prompt, *expected)
    assert _files(loras) == before  # nothing written, nothing replaced, no temp file left

    entry = server.wait(server.queue_prompt(merge_and_save()), timeout=300)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (saved,) = [Path(t) for o in entry["outputs"].values() for t in o.get("text", []) if t.endswith(".safetensors")]
    saved.unlink()
