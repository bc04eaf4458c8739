"""The save node's numbered names: checked before the first write, and a folder in the way is skipped."""

import pytest

from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def merged(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "names_subject.safetensors", random_lora(layout, rank=4, seed=61))
    write_lora(loras / "names_style.safetensors", random_lora(layout, rank=4, seed=62))
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto")
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(model, hypernet, "names_subject.safetensors",
                                                             "names_style.safetensors", 1.0, 1.0, 1.0, 1.0,
                                                             "direct", "sum", clip=clip)[2]


def test_a_name_whose_numbered_form_is_too_long_is_refused_before_writing(comfy_host, merged):
    nodes, _, loras = comfy_host
    name = "n" * 225  # fits once, but not as name_00001 beside it
    with pytest.raises(ValueError, match="too long"):
        nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, name, "fp16", "add number")
    assert not list(loras.glob("n" * 50 + "*"))


def test_a_folder_in_the_way_takes_the_next_number(comfy_host, merged):
    nodes, _, loras = comfy_host
    (loras / "in_the_way.safetensors").mkdir()
    (path,) = nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, "in_the_way", "fp16", "add number")["result"]
    assert path.endswith("in_the_way_00001.safetensors")
