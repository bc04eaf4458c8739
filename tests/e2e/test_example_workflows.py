"""Every example workflow, converted to the API format and run on a real ComfyUI server over HTTP."""

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import SD15_LORA, STYLE, SUBJECT
from devkit.synthetic_models import CHECKPOINT_NAME
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# evaluate and compare (they need a judge): test_evaluate_workflow.py, test_compare_workflow.py; ziplora (reference
# images, an optimisation instead of the hypernet's report): test_ziplora_workflow.py
WORKFLOWS = sorted(p for p in (REPO / "example_workflows").glob("*.json")
                   if not {"evaluate", "compare", "ziplora"} & set(p.stem.split("_")))
# workflows as the first release (0.1.0) saved them: what users already have must keep loading and running
OLD_WORKFLOWS = sorted((REPO / "tests" / "fixtures" / "workflows_0.1.0").glob("*.json"))
PACK_NODES = ("LoraRarHypernetLoader", "LoraRarMerge", "LoraRarSaveMergedLora", "LoraRarCoefficientPicture",
              "LoraRarCompare", "LoraRarEvaluate", "LoraRarZipLora")


def for_this_machine(prompt: dict, **merge_inputs) -> dict:
    """Swap the user-facing defaults for the synthetic test files and CPU-sized sampling."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        elif kind == "LoraRarMerge":
            inputs.update(subject_lora=SUBJECT, style_lora=STYLE, **merge_inputs)
        elif kind == "EmptyLatentImage":
            inputs.update(width=128, height=128)
        elif kind == "KSampler":
            inputs.update(steps=1, sampler_name="euler", scheduler="normal")
    return prompt


def reports(entry: dict) -> list[str]:
    return [text for output in entry["outputs"].values() for text in output.get("text", []) if "LoRA.rar merge" in text]


def images_of(server, entry: dict, prompt: dict, class_type: str) -> list[Path]:
    """The image files the nodes of one class wrote (SaveImage: output folder, PreviewImage: temp)."""
    ids = [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
    return server.output_files({"outputs": {i: out for i, out in entry["outputs"].items() if i in ids}})


def execution_error(entry: dict) -> str:
    return " ".join(m[1].get("exception_message", "") for m in entry["status"]["messages"] if m[0] == "execution_error")


@pytest.mark.parametrize("workflow", WORKFLOWS + OLD_WORKFLOWS,
                         ids=lambda p: p.stem + ("" if p.parent.name == "example_workflows" else "@0.1.0"))
def test_example_workflow_runs(workflow, pack_server, synthetic_layout):
    server, loras = pack_server
    prompt = for_this_machine(ui_to_api(json.loads(workflow.read_text()), server.object_info()))
    kinds = {node["class_type"] for node in prompt.values()}
    entry = server.wait(server.queue_prompt(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success", execution_error(entry)

    attention = len(synthetic_layout.attention_linears())
    (report,) = reports(entry)
    assert f"hypernet {attention // 2}," in report and f"applied to the model: {attention} layers" in report
    if "SaveImage" in kinds:
        (image,) = images_of(server, entry, prompt, "SaveImage")
        assert image.read_bytes().startswith(b"\x89PNG")
    if "LoraRarCoefficientPicture" in kinds:
        from PIL import Image

        (picture,) = images_of(server, entry, prompt, "PreviewImage")
        with Image.open(picture) as drawn:
            assert drawn.width >= 600 and drawn.height >= 300 and len(drawn.convert("RGB").getcolors(2**24)) > 50
    if "LoraRarSaveMergedLora" in kinds:
        (saved,) = [Path(t) for o in entry["outputs"].values() for t in o.get("text", []) if t.endswith(".safetensors")]
        assert saved.is_file() and saved.parent.parent == loras
        saved.unlink()  # tidy; a second run would add a number (if_exists "add number")


def test_bad_inputs_are_reported_and_the_server_keeps_running(pack_server):
    server, loras = pack_server
    workflow = json.loads((REPO / "example_workflows" / "lorarar_merge_and_save_lora.json").read_text())
    info = server.object_info()

    missing = for_this_machine(ui_to_api(workflow, info))
    for node in missing.values():
        if node["class_type"] == "LoraRarMerge":
            node["inputs"]["subject_lora"] = "no_such_lora.safetensors"
    status, body = server.submit(missing)
    assert status == 400 and "no_such_lora.safetensors" in json.dumps(body["node_errors"])

    other_base = for_this_machine(ui_to_api(workflow, info))
    for node in other_base.values():
        if node["class_type"] == "LoraRarMerge":
            node["inputs"]["subject_lora"] = SD15_LORA
    entry = server.wait(server.queue_prompt(other_base), timeout=300)
    assert entry["status"]["status_str"] == "error"
    message = execution_error(entry)
    assert SD15_LORA in message and "different base models" in message and "\n" not in message.strip()

    good = for_this_machine(ui_to_api(workflow, info), method="direct")
    entry = server.wait(server.queue_prompt(good), timeout=300)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    for output in entry["outputs"].values():
        for text in output.get("text", []):
            if text.endswith(".safetensors"):
                Path(text).unlink()


def test_pack_nodes_are_listed_with_tooltips(pack_server):
    server, _ = pack_server
    info = server.object_info()
    for name in PACK_NODES:
        node = info[name]
        assert node["category"] == "LoRA.rar" and node["description"]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert "CC BY-NC-SA 4.0" in info["LoraRarHypernetLoader"]["description"]
    assert {"auto", "sdxl", "koala-700m"} <= set(info["LoraRarHypernetLoader"]["input"]["required"]["hypernet"][0])


def test_committed_workflows_match_the_generator(pack_server):
    """example_workflows/*.json are what scripts/build_example_workflows.py makes from the live node definitions."""
    import importlib.util

    from devkit.workflows import build_ui_workflow

    spec = importlib.util.spec_from_file_location("build_example_workflows", REPO / "scripts" / "build_example_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    info = pack_server[0].object_info()
    for name, (title, nodes) in builder.WORKFLOWS.items():
        committed = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        assert _comparable(build_ui_workflow(nodes, info, title)) == _comparable(committed), \
            f"{name}.json is stale: rerun scripts/build_example_workflows.py"


def _comparable(workflow: dict) -> dict:
    """The workflow without the unlinked outputs of stock nodes: ComfyUI 0.33 gave SaveImage an IMAGE and
    PreviewAny a STRING output that 0.3.75 lacks; the files are generated on the current host, and every
    input, widget, link and pack-node output must still match on both."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] not in PACK_NODES:
            node["outputs"] = [out for out in node["outputs"] if out.get("links")]
    return workflow
