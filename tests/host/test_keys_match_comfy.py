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
