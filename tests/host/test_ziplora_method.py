"""ZipLoRA as a registered method, in a real ComfyUI process: the ZipLoRA node's settings come from its parameters,
and the merge and compare nodes, which have no reference images, list it and say in one line what it needs."""

import pytest
import torch

from devkit.loaded_pack import pack_module
from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host

NEEDS = "zip-lora: needs reference images and prompts of the subject and the style"


@pytest.fixture(scope="module")
def pair(comfy_host, layout):
    _, _, loras = comfy_host
    write_lora(loras / "zipmethod_subject.safetensors", random_lora(layout, rank=4, seed=241))
    write_lora(loras / "zipmethod_style.safetensors", random_lora(layout, rank=4, seed=242))
    return "zipmethod_subject.safetensors", "zipmethod_style.safetensors"


def test_the_ziplora_nodes_settings_are_the_registered_methods_parameters(comfy_host):
    nodes, _, _ = comfy_host
    method = pack_module(nodes, "hypernet.methods").get("zip-lora")
    inputs = nodes.NODE_CLASS_MAPPINGS["LoraRarZipLora"].INPUT_TYPES()["required"]
    for param in method.params:
        options = inputs[param.name][1]
        assert (options["default"], options["min"], options["max"]) == (param.default, param.minimum, param.maximum)
        assert options["tooltip"] == param.help
    assert inputs["steps"][0] == "INT" and inputs["seed"][0] == "INT"  # counts stay integer widgets
    assert pack_module(nodes, "hypernet.ziplora").DEFAULT_LAMBDA == inputs["similarity_lambda"][1]["default"]


def test_the_merge_and_compare_nodes_list_it_without_its_widgets(comfy_host):
    nodes, _, _ = comfy_host
    merge = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].INPUT_TYPES()
    compare = nodes.NODE_CLASS_MAPPINGS["LoraRarCompare"].INPUT_TYPES()
    assert "zip-lora" in merge["required"]["method"][0]
    assert "zip-lora" in compare["required"]["methods"][1]["tooltip"]
    assert not [name for name in (*merge["optional"], *compare["optional"]) if name.startswith("zip_lora_")]


def test_the_merge_node_refuses_it_in_one_line_naming_what_is_missing(comfy_host, synthetic_model, pair):
    from tests.host.test_nodes_inprocess import _merge

    model, clip = synthetic_model
    with pytest.raises(ValueError) as error:  # LoraRarError, as the pack's module loaded in ComfyUI defines it
        _merge(comfy_host, model, clip, *pair, method="zip-lora")
    message = str(error.value)
    assert message.startswith(NEEDS) and "LoRA.rar ZipLoRA node" in message and "\n" not in message


def test_its_compare_column_is_a_tile_saying_what_it_needs(comfy_host, synthetic_model, pair):
    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    node = nodes.NODE_CLASS_MAPPINGS["LoraRarCompare"]()
    with pytest.raises(ValueError) as error:  # b-lora cannot run on this layout either: no column runs
        node.compare(model, None, *pair, "a dog", "", {"samples": torch.zeros(1, 4, 4, 4)}, 1, 1, 1.0, "euler",
                     "normal", 1.0, "zip-lora, b-lora", "sum", clip=clip)
    message = str(error.value)
    assert f"zip-lora: {NEEDS}" in message and "\n" not in message  # labelled without parameters it never ran with
