"""Per-block coefficient summaries and the coefficient picture, against numbers worked out by hand."""

import json

import numpy
import pytest
import torch

from devkit.loras import random_lora
from hypernet.base_models import KOALA_700M
from hypernet.coefficients import (SUBJECT_COLOUR, STYLE_COLOUR, block_of, coefficient_picture, overall, summarize,
                                   summary_lines)
from hypernet.errors import LoraRarError
from hypernet.lora_io import lora_from_tensors
from hypernet.merge import merge_loras
from hypernet.model import LoraRarHypernet
from devkit.weights import shared_hypernet

# (d_in, 2) columns of subject / style coefficients; the block, projection and sums are worked out below
HAND = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": [[1.0, 0.5], [0.2, -0.8], [0.0, 0.0]],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q": [[0.4, 0.6]],
    "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_out_0": [[-2.0, 1.0], [3.0, 0.0]],
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q": [[0.0, 1.0]],
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0": [[1.0, -1.0]],  # a tie: not style-dominant
}


def _hand():
    return {name: torch.tensor(values) for name, values in HAND.items()}


def test_block_and_projection_of_layer_names():
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == ("input_blocks.4", "q")
    assert block_of("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0") == ("middle_block", "out")
    assert block_of("lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_v") == ("output_blocks.11", "v")
    assert block_of("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == ("other", "other")


def test_group_means_and_style_dominant_share_match_a_hand_computation():
    groups = summarize(_hand())
    # model order: input blocks by number, the middle block, output blocks
    assert [(g.block, g.projection) for g in groups] == [
        ("input_blocks.1", "out"), ("input_blocks.4", "q"), ("middle_block", "out"), ("output_blocks.0", "q")]
    tie, input4, middle, output0 = groups
    # input_blocks.4 q: columns (1, .5) (.2, -.8) (0, 0) (.4, .6): subject 1.6 / 4, style .3 / 4; |style| wins twice
    assert (input4.layers, input4.columns) == (2, 4)
    assert input4.subject_mean == pytest.approx(0.4) and input4.style_mean == pytest.approx(0.075)
    assert input4.style_dominant == pytest.approx(0.5)
    assert (middle.subject_mean, middle.style_mean, middle.style_dominant) == pytest.approx((0.5, 0.5, 0.0))
    assert output0.style_dominant == 1.0 and tie.style_dominant == 0.0
    everything = overall(_hand())
    assert (everything.layers, everything.columns) == (5, 8)
    assert everything.subject_mean == pytest.approx((1.6 + 1.0 + 0.0 + 1.0) / 8)
    assert everything.style_mean == pytest.approx((0.3 + 1.0 + 1.0 - 1.0) / 8)
    assert everything.style_dominant == pytest.approx(3 / 8)
    assert overall(_hand(), "q").columns == 5


def test_summary_is_one_line_per_block():
    lines = summary_lines(summarize(_hand()))
    assert len(lines) == 4 and lines[1].startswith("input_blocks.4: q subject 0.40 style ")
    assert "style-dominant 50%" in lines[1]


def test_picture_is_an_rgb_image_with_both_colours_drawn():
    picture = coefficient_picture(_hand(), "lorarar: hand-made coefficients")
    pixels = numpy.asarray(picture)
    assert picture.mode == "RGB" and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    for colour in (SUBJECT_COLOUR, STYLE_COLOUR):
        rgb = numpy.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        close = (numpy.abs(pixels.astype(int) - rgb).sum(axis=2) < 40).sum()
        assert close > 200, f"too few {colour} pixels ({close}): a box or the legend is missing"
    assert len(numpy.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, boxes, shading: not a blank canvas


def test_nothing_to_draw_is_a_one_line_error():
    with pytest.raises(LoraRarError, match="no layer has merge coefficients"):
        coefficient_picture({})


@pytest.fixture(scope="module")
def koala_pair():
    subject = lora_from_tensors(random_lora(KOALA_700M, rank=4, seed=31), "subject.safetensors", layout=KOALA_700M)
    style = lora_from_tensors(random_lora(KOALA_700M, rank=4, seed=32), "style.safetensors", layout=KOALA_700M)
    return subject, style


def test_a_lorarar_merge_keeps_its_coefficients_and_summarizes_them_per_block(koala_pair, shared_weights):
    hypernet = LoraRarHypernet.load(shared_hypernet("koala-700m"))
    merged = merge_loras(*koala_pair, hypernet, layout=KOALA_700M)
    hypernet_layers = [name for name, action in merged.report.actions.items() if action == "hypernet"]
    assert sorted(merged.coefficients) == sorted(hypernet_layers) and hypernet_layers
    for name, coefficients in merged.coefficients.items():
        assert coefficients.dtype == torch.float32 and coefficients.device.type == "cpu"
        assert coefficients.shape == (merged.layers[name].d_in, 2)
    blocks = merged.report.as_dict()["coefficient_blocks"]
    assert blocks == [group.as_dict() for group in summarize(merged.coefficients)]
    assert {(b["block"], b["projection"]) for b in blocks} == {block_of(name) for name in hypernet_layers}
    assert json.loads(merged.metadata("test")["lorarar_report"])["coefficient_blocks"] == json.loads(json.dumps(blocks))
    text = merged.report.to_text()
    assert sum(line.startswith("  input_blocks.") for line in text.splitlines()) == len(
        {b["block"] for b in blocks if b["block"].startswith("input_blocks.")})

    dropped = hypernet_layers[0]
    smaller = merged.without({dropped: "test"})
    assert dropped not in smaller.coefficients and len(smaller.coefficients) == len(merged.coefficients) - 1
    assert smaller.report.coefficient_blocks == summarize(smaller.coefficients)
    renamed = merged.named("a.safetensors", "b.safetensors", "/x/a.safetensors", "/x/b.safetensors")
    assert renamed.coefficients is merged.coefficients


def test_a_direct_merge_has_no_coefficients(koala_pair):
    merged = merge_loras(*koala_pair, None, method="direct", layout=KOALA_700M)
    assert merged.coefficients == {} and "coefficient_blocks" not in merged.report.as_dict()
