"""Hostile split pieces read through a key map (hypernet/model_keys.py, what the merge node does on DiT models):
joined exactly whatever the pieces' type, refused naming only the pieces at fault, file names kept to one short line."""

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.model_keys import lora_for_model

WEIGHT = "diffusion_model.blk.qkv.weight"
SHAPES = {WEIGHT: (96, 32)}
# the diffusers pieces q, k, v on row bands of one fused qkv, as ComfyUI's map sends them, and the fused layer itself
KEY_MAP = {**{f"t.{n}": (WEIGHT, (0, 32 * i, 32)) for i, n in enumerate("qkv")}, "diffusion_model.blk.qkv": WEIGHT}


def pieces(dtype=torch.float32, up_std=1e-3, rank=32, alpha=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for n in "qkv":
        state[f"t.{n}.lora_A.weight"] = (torch.randn(rank, 32, generator=generator) * 0.02).to(dtype)
        state[f"t.{n}.lora_B.weight"] = (torch.randn(32, rank, generator=generator) * up_std).to(dtype)
        state[f"t.{n}.alpha"] = torch.tensor(alpha)
    return state


def dense_of_pieces(state, rank, alpha):
    return torch.cat([state[f"t.{n}.lora_B.weight"].double() @ state[f"t.{n}.lora_A.weight"].double() * (alpha / rank)
                      for n in "qkv"])


def joined_dense(state):
    layer = lora_for_model(state, "x.safetensors", KEY_MAP, SHAPES).layers["lora_unet_blk_qkv"]
    return (layer.up.double() @ layer.down.double()) * layer.scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pieces_are_joined_without_rounding_their_scale_in(dtype):
    # alpha 1 at rank 24 scales ups of ~1e-3 to ~4e-5: below float16's normal range, rounded hard if folded there
    # (and 1/24 is no power of two, so bfloat16 would round each product too)
    state = pieces(dtype, up_std=1e-3, rank=24, alpha=1.0)
    expected = dense_of_pieces(state, 24, 1.0)
    assert float((joined_dense(state) - expected).norm() / expected.norm()) <= 1e-6


def test_a_large_alpha_with_small_factors_is_joined_not_overflowed():
    # the product is ordinary; only scale * up alone exceeds float16 (the fused kohya form of the same file merges)
    state = pieces(torch.float16, up_std=0.05, rank=4, alpha=1e6)
    for n in "qkv":
        state[f"t.{n}.lora_A.weight"] = (state[f"t.{n}.lora_A.weight"].float() * 1e-5).half()
    expected = dense_of_pieces(state, 4, 1e6)
    got = joined_dense(state)
    assert torch.isfinite(got).all()
    assert float((got - expected).norm() / expected.norm()) <= 1e-6


def test_one_piece_written_twice_names_that_piece_only():
    state = pieces()
    state["t2.q.lora_A.weight"], state["t2.q.lora_B.weight"] = state["t.q.lora_A.weight"], state["t.q.lora_B.weight"]
    key_map = {**KEY_MAP, "t2.q": KEY_MAP["t.q"]}
    with pytest.raises(LoraRarError, match=r"^x\.safetensors: layers t\.q, t2\.q all patch lora_unet_blk_qkv \(the same"):
        lora_for_model(state, "x.safetensors", key_map, SHAPES)


def test_a_text_encoder_only_lora_without_clip_says_to_connect_one():
    state = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8)}
    with pytest.raises(LoraRarError, match=r"^x\.safetensors: all its 1 LoRA layers are text-encoder layers .* no CLIP "
                                           r"is connected: connect the CLIP"):
        lora_for_model(state, "x.safetensors", KEY_MAP, SHAPES, text_encoders=False)
    with pytest.raises(LoraRarError, match=r"none of its 1 LoRA layers is a layer"):
        lora_for_model(state, "x.safetensors", KEY_MAP, SHAPES, text_encoders=True)
    state.update(pieces())
    lora = lora_for_model(state, "x.safetensors", KEY_MAP, SHAPES, text_encoders=False)
    assert "1 text-encoder layers not merged: no CLIP is connected (connect one to merge them)" in lora.notes


def test_an_unmapped_layer_name_is_shown_on_one_short_line():
    stem = "t.we\nird " + "x" * 5000
    state = {f"{stem}.lora_A.weight": torch.ones(2, 8), f"{stem}.lora_B.weight": torch.ones(8, 2)}
    with pytest.raises(LoraRarError) as error:
        lora_for_model(state, "x.safetensors", KEY_MAP, SHAPES)
    assert len(str(error.value)) < 400 and "\n" not in str(error.value)

