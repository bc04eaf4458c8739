"""Layers LoRA.rar does not cover follow the chosen policy, and the report accounts for every layer."""

import pytest
import torch
from safetensors.torch import save_file

from hypernet.lora_io import read_lora
from hypernet.merge import Strengths, merge_loras
from hypernet.model import LoraRarHypernet
from devkit.weights import hypernet_file

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
PROJ_IN = "lora_unet_input_blocks_4_1_proj_in"  # not an attention projection
TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
ONLY_STYLE = "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_q"
DORA = "lora_unet_input_blocks_4_1_proj_out"
Q320 = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # width 320: no hypernet input


def layer(state, name, d_out, d_in, rank, seed, dora=False):
    generator = torch.Generator().manual_seed(seed)
    state[f"{name}.lora_up.weight"] = torch.randn(d_out, rank, generator=generator) * 0.02
    state[f"{name}.lora_down.weight"] = torch.randn(rank, d_in, generator=generator) * 0.02
    if dora:
        state[f"{name}.dora_scale"] = torch.ones(d_out, 1)


@pytest.fixture
def pair(tmp_path):
    subject, style = {}, {}
    for state, seed in ((subject, 1), (style, 2)):
        layer(state, Q, 640, 640, 4, seed)
        layer(state, PROJ_IN, 640, 640, 4, seed + 10)
        layer(state, TE, 768, 768, 4, seed + 20)
        layer(state, Q320, 320, 320, 4, seed + 30)
    layer(style, ONLY_STYLE, 1280, 1280, 4, 40)
    layer(subject, DORA, 640, 640, 4, 50, dora=True)
    paths = []
    for name, state in (("subject", subject), ("style", style)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        paths.append(read_lora(tmp_path / f"{name}.safetensors"))
    return paths


@pytest.fixture(scope="module")
def hypernet(shared_weights):
    return LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))


def product(layer):
    return layer.up.double() @ layer.down.double() * layer.scale


def test_sum_policy_is_the_strength_weighted_sum_kept_low_rank(pair, hypernet):
    subject, style = pair
    merged = merge_loras(subject, style, hypernet, strengths=Strengths(0.5, 2.0, 0.25, 3.0))
    actions = merged.report.actions
    assert actions[Q] == "hypernet"
    assert actions[PROJ_IN] == actions[TE] == actions[Q320] == "summed"
    assert actions[ONLY_STYLE] == "kept (style)" and actions[DORA] == "skipped"
    assert "DoRA" in merged.report.reasons[DORA] and "width 320" in merged.report.reasons[Q320]
    expected = 0.5 * product(subject.layers[PROJ_IN]) + 2.0 * product(style.layers[PROJ_IN])
    assert merged.layers[PROJ_IN].rank == 8
    torch.testing.assert_close(product(merged.layers[PROJ_IN]), expected)
    expected_te = 0.25 * product(subject.layers[TE]) + 3.0 * product(style.layers[TE])  # clip strengths
    torch.testing.assert_close(product(merged.layers[TE]), expected_te)
    assert set(actions) == {Q, PROJ_IN, TE, Q320, ONLY_STYLE, DORA}


@pytest.mark.parametrize("policy", ["subject", "style", "skip"])
def test_other_policies(pair, hypernet, policy):
    subject, style = pair
    merged = merge_loras(subject, style, hypernet, policy=policy)
    assert merged.report.actions[Q] == "hypernet"
    if policy == "skip":
        assert {PROJ_IN, TE, Q320, ONLY_STYLE} & set(merged.layers) == set()
        assert all(merged.report.actions[n] == "skipped" for n in (PROJ_IN, TE, Q320, ONLY_STYLE))
    else:
        source = subject if policy == "subject" else style
        torch.testing.assert_close(product(merged.layers[PROJ_IN]), product(source.layers[PROJ_IN]))
        assert (ONLY_STYLE in merged.layers) == (policy == "style")
    assert "layer policy" in merged.report.to_text()


def test_direct_method_sums_everything_without_a_hypernet(pair):
    subject, style = pair
    merged = merge_loras(subject, style, None, method="direct")
    torch.testing.assert_close(product(merged.layers[Q]), product(subject.layers[Q]) + product(style.layers[Q]))
    assert merged.report.hypernet_layers == 0 and merged.report.hypernet is None


def test_float16_factor_that_would_overflow_is_kept_in_float32(tmp_path):
    state = {f"{PROJ_IN}.lora_up.weight": torch.ones(640, 2, dtype=torch.float16),
             f"{PROJ_IN}.lora_down.weight": torch.full((2, 640), 10_000.0, dtype=torch.float16)}
    save_file(state, str(tmp_path / "big.safetensors"))
    lora = read_lora(tmp_path / "big.safetensors")
    merged = merge_loras(lora, lora, None, method="direct", strengths=Strengths(10.0, 1.0))  # 10 is the largest strength
    layer = merged.layers[PROJ_IN]
    assert layer.down.dtype == torch.float32 and torch.isfinite(layer.down).all()
    assert float(layer.down[0, 0]) == 100_000.0


def test_saved_float16_file_keeps_an_overflowing_layer_in_float32(tmp_path):
    state = {f"{PROJ_IN}.lora_up.weight": torch.ones(640, 2), f"{PROJ_IN}.lora_down.weight": torch.full((2, 640), 1e5)}
    save_file(state, str(tmp_path / "huge.safetensors"))
    lora = read_lora(tmp_path / "huge.safetensors")
    merged = merge_loras(lora, lora, None, method="direct")
    tensors = merged.kohya_state_dict(torch.float16)
    assert tensors[f"{PROJ_IN}.lora_down.weight"].dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in tensors.values())
