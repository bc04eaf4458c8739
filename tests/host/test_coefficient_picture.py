"""The coefficient picture node on a real ComfyUI: a merge through the merge node with a published hypernet."""

import pytest
import torch

from devkit.loras import random_lora, write_lora
from devkit.weights import hypernet_file, shared_hypernet

pytestmark = pytest.mark.host


def _merge(nodes, model, clip, method, hypernet="sdxl"):
    (net,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load(hypernet)
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(model, net, "coef_subject.safetensors", "coef_style.safetensors",
                                                             1.0, 1.0, 1.0, 1.0, method, "sum", clip=clip)


@pytest.fixture(scope="module")
def pair(comfy_host, layout):
    _, _, loras = comfy_host
    write_lora(loras / "coef_subject.safetensors", random_lora(layout, rank=8, seed=101, alpha=4.0))
    write_lora(loras / "coef_style.safetensors", random_lora(layout, rank=8, seed=102))


def test_picture_of_a_lorarar_merge_with_the_published_hypernet(comfy_host, synthetic_model, layout, pair):
    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    assert shared_hypernet("sdxl").is_file()
    _, _, merged, report = _merge(nodes, model, clip, "lorarar")
    assert hypernet_file("sdxl") in report and "coefficients per block" in report
    image, summary = nodes.NODE_CLASS_MAPPINGS["LoraRarCoefficientPicture"]().draw(merged)
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert image.shape[1] >= 300 and image.shape[2] >= 600
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    hypernet_layers = sum(1 for action in merged.report.actions.values() if action == "hypernet")
    assert f"all {hypernet_layers} layers" in summary
    blocks = {group.block for group in merged.report.coefficient_blocks}
    assert len(summary.splitlines()) == 2 + len(blocks)
    # the node output goes into stock nodes as any IMAGE does
    nodes.NODE_CLASS_MAPPINGS["PreviewImage"]().save_images(image)


def test_a_merge_without_coefficients_is_a_one_line_error(comfy_host, synthetic_model, layout, pair):
    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    merged = _merge(nodes, model, clip, "direct")[2]
    with pytest.raises(ValueError, match="made with direct: it has no per-column coefficients; the picture needs "
                                         r"lorarar \(or zip-lora\)") as error:
        nodes.NODE_CLASS_MAPPINGS["LoraRarCoefficientPicture"]().draw(merged)
    assert "\n" not in str(error.value)
