"""Saved workflows hold widget values by position, and every merge method's parameters are widgets of the merge and
compare nodes: a new method, whatever its name and import order, must leave every saved workflow's values on the
inputs they were saved for. Checked in-process with the nodes' real INPUT_TYPES and the converter the e2e tests use."""

import contextlib
import json
from pathlib import Path

import pytest

from devkit.loaded_pack import pack_module
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted([*(REPO / "example_workflows").glob("*.json"), *(REPO / "tests" / "fixtures").rglob("*.json")])
MERGE_NODES = ("LoraRarMerge", "LoraRarCompare")  # the nodes whose optional inputs are the methods' parameters
# what the saved workflows hold today, by input name (a change of the methods' order would move these)
PINNED = {
    ("lorarar_merge_and_save_lora", "LoraRarMerge"): {
        "method": "lorarar", "layer_policy": "sum", "np_lora_mu": 0.5, "k_lora_alpha": 1.5, "k_lora_beta": 1.275,
        "k_lora_linear_alpha": 1.5, "k_lora_linear_beta": 0.5},
    ("lorarar_compare_methods", "LoraRarCompare"): {
        "methods": "all", "layer_policy": "sum", "np_lora_mu": 0.5, "k_lora_alpha": 1.5, "k_lora_beta": 1.275,
        "k_lora_linear_alpha": 1.5, "k_lora_linear_beta": 0.5},
    ("lorarar_ziplora_optimise", "LoraRarZipLora"): {
        "steps": 100, "learning_rate": 0.01, "similarity_lambda": 0.01, "seed": 0, "stop_similarity": 0.001},
}


def _object_info(nodes) -> dict:
    """What the server's /object_info gives the converter: each node type's inputs, from its INPUT_TYPES now."""
    types = {node["type"] for path in WORKFLOWS for node in json.loads(path.read_text())["nodes"]}
    return {kind: {"input": nodes.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()}
            for kind in types if kind in nodes.NODE_CLASS_MAPPINGS}


def _widget_names(info: dict) -> list[str]:
    """The widget inputs of a node type, in the order widgets_values holds them."""
    inputs = info["input"]
    return [name for name, spec in [*inputs["required"].items(), *inputs.get("optional", {}).items()]
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


def _values(object_info: dict) -> dict:
    """workflow file -> its API prompt: every node's inputs by name, widget values included."""
    return {path: ui_to_api(json.loads(path.read_text()), object_info) for path in WORKFLOWS}


@pytest.fixture
def first_by_name(comfy_host):
    """A context in which a method named to sort first, with parameters and declared as one added now would be, is
    registered in the registry the loaded pack's nodes read."""
    nodes, _, _ = comfy_host
    registry = pack_module(nodes, "hypernet.methods")
    version = pack_module(nodes, "hypernet").__version__

    class FirstByName(registry.MergeMethod):
        name = "aaa-toy"
        help = "sorts first by name"
        since = version
        position = 1 + max(m.position for m in registry.all_methods() if m.since == version)
        params = (registry.Param("zeta", 1.0, 0.0, 2.0, "first"), registry.Param("alpha", 0.0, 0.0, 1.0, "second"))

    @contextlib.contextmanager
    def registered():
        registry.register(FirstByName())
        try:
            yield
        finally:
            registry.unregister("aaa-toy")

    return registered


def test_the_workflows_under_test_are_all_there():
    names = {(path.parent.name, path.stem) for path in WORKFLOWS}
    assert len([n for n in names if n[0] == "example_workflows"]) == 6 and ("workflows_0.1.0", "lorarar_merge_and_save_lora") in names


def test_a_method_that_sorts_first_keeps_every_saved_workflows_values(comfy_host, first_by_name):
    nodes, _, _ = comfy_host
    before_info = _object_info(nodes)
    assert set(before_info) >= {node["type"] for p in WORKFLOWS for node in json.loads(p.read_text())["nodes"]
                                if node["type"] not in ("Note", "MarkdownNote")}
    before = _values(before_info)
    with first_by_name():
        after_info = _object_info(nodes)
        after = _values(after_info)
    for kind in MERGE_NODES:
        widgets_before, widgets_after = _widget_names(before_info[kind]), _widget_names(after_info[kind])
        assert widgets_after == [*widgets_before, "aaa_toy_zeta", "aaa_toy_alpha"], kind
    assert after == before
    for (stem, kind), pinned in PINNED.items():
        (prompt,) = [after[path] for path in WORKFLOWS if path.stem == stem and path.parent.name == "example_workflows"]
        (inputs,) = [node["inputs"] for node in prompt.values() if node["class_type"] == kind]
        assert {name: inputs[name] for name in pinned} == pinned, stem


@pytest.mark.parametrize("stem", ["lorarar_merge_and_save_lora", "lorarar_sdxl_merge_and_sample"])
def test_a_first_release_workflow_still_maps_its_values(comfy_host, first_by_name, stem):
    """0.1.0 saved the merge node before any method had parameters: its values stay on the same inputs."""
    nodes, _, _ = comfy_host
    path = REPO / "tests" / "fixtures" / "workflows_0.1.0" / f"{stem}.json"
    with first_by_name():
        prompt = ui_to_api(json.loads(path.read_text()), _object_info(nodes))
    (inputs,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "LoraRarMerge"]
    assert {name: value for name, value in inputs.items() if not isinstance(value, list)} == {
        "subject_lora": "my_subject_lora.safetensors", "style_lora": "my_style_lora.safetensors",
        "subject_strength": 1.0, "style_strength": 1.0, "subject_clip_strength": 1.0, "style_clip_strength": 1.0,
        "method": "lorarar", "layer_policy": "sum"}
