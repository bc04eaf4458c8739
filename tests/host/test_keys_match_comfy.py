"""Our file-format normalisation agrees with ComfyUI's own diffusers -> SGM key map."""

import pytest

from hypernet.base_models import KOALA_700M, SDXL, UNetLayout
from hypernet.keys import canonical_name

pytestmark = pytest.mark.host


def comfy_unet_config(layout: UNetLayout) -> dict:
    return {
        "num_res_blocks": list(layout.num_res_blocks),
        "channel_mult": [c // layout.channels[0] for c in layout.channels],
        "model_channels": layout.channels[0],
        "transformer_depth": list(layout.transformer_depth),
        "transformer_depth_output": list(reversed(layout.transformer_depth_output)),
        "transformer_depth_middle": layout.transformer_depth_middle,
        "context_dim": layout.context_dim,
    }


@pytest.mark.parametrize("layout", [SDXL, KOALA_700M], ids=lambda l: l.name)
def test_every_diffusers_unet_module_maps_like_comfyui(comfy_host, layout):
    import comfy.utils

    config = comfy_unet_config(layout)
    assert UNetLayout.from_unet_config(layout.name, config) == layout
    mapping = comfy.utils.unet_to_diffusers(config)
    checked = 0
    for diffusers_key, sgm_key in mapping.items():
        if not diffusers_key.endswith(".weight") or ".norm" in diffusers_key and "transformer" not in diffusers_key:
            continue
        module = diffusers_key[: -len(".weight")]
        expected = "lora_unet_" + sgm_key[: -len(".weight")].replace(".", "_")
        for written in (f"unet.{module}", f"lora_unet_{module.replace('.', '_')}", f"unet.unet.{module}"):
            assert canonical_name(written, layout) == expected, written
        checked += 1
    assert checked > 500 if layout is SDXL else checked > 100


def test_sdxl_layout_matches_what_comfyui_detects(comfy_host):
    import comfy.supported_models

    detected = dict(comfy.supported_models.SDXL.unet_config, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
    assert UNetLayout.from_unet_config("sdxl", detected) == SDXL
    assert len(SDXL.attention_linears()) == 560


@pytest.mark.parametrize("fmt", ["kohya", "kohya-diffusers", "peft", "diffusers", "reference", "processor"])
def test_the_nodes_key_map_reading_and_the_sdxl_parser_agree(synthetic_model, layout, fmt):
    """On an SDXL-family model, reading a file through ComfyUI's key map (what the merge node does) gives the
    same layers, names and factors as the pack's own SDXL parser (what the CLI and the hypernet roles use)."""
    import torch

    import comfy.lora
    from devkit.loras import random_lora
    from hypernet.lora_io import lora_from_tensors
    from hypernet.model_keys import lora_for_model

    model, clip = synthetic_model
    state = random_lora(layout, rank=4, seed=3, fmt=fmt, alpha=2.0)
    text_layer = "text_model.encoder.layers.0.self_attn.q_proj"
    width = clip.cond_stage_model.state_dict()[f"clip_l.transformer.{text_layer}.weight"].shape
    text_stem = f"lora_te1_{text_layer.replace('.', '_')}" if fmt.startswith("kohya") else f"text_encoder.{text_layer}"
    up, down = (".lora_up.weight", ".lora_down.weight") if fmt.startswith("kohya") else (".lora_B.weight", ".lora_A.weight")
    state[text_stem + up], state[text_stem + down] = torch.randn(width[0], 4), torch.randn(4, width[1])
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    weights = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    through_comfy = lora_for_model(state, "x.safetensors", key_map, {k: tuple(v.shape) for k, v in weights.items()},
                                   layout=layout)
    ours = lora_from_tensors(state, "x.safetensors", layout=layout)
    assert set(through_comfy.layers) == set(ours.layers)
    assert len(ours.layers) == len(layout.attention_linears()) + 1
    for name, layer in ours.layers.items():
        other = through_comfy.layers[name]
        assert torch.equal(other.up, layer.up) and torch.equal(other.down, layer.down) and other.scale == layer.scale
    assert not through_comfy.unmapped
