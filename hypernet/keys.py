"""Tensor keys of LoRA files -> canonical kohya layer names (the names every SDXL tool reads).

The canonical name of a layer is its kohya stem: ``lora_unet_<SGM module, dots as underscores>`` for
the UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_te1_...`` /
``lora_te2_...`` for the two SDXL text encoders. kohya (SGM or diffusers block names), PEFT/diffusers
(``unet.<module>.lora_A/lora_B``, ``.lora.down/.lora.up``, ``.processor.to_q_lora``) and the LoRA.rar
reference code's ``unet.unet.<module>`` all land on the same name, so subject and style layers pair up.
ComfyUI maps canonical names to model weights itself (comfy.lora.model_lora_keys_unet / _clip); the
diffusers -> SGM block renaming here is checked against comfy.utils.unet_to_diffusers by the tests.
What a key or a name says without a layout (``split_key``, ``FACTOR_SUFFIXES``, ``attention_role``) is names.py's,
exported here too.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .base_models import SDXL, UNetLayout
from .names import (ATTENTION_ROLES, FACTOR_SUFFIXES, FUSED_WITH_MLP, attention_role,  # noqa: F401  (public here too)
                    split_key)

_UNET_PREFIXES = ("lora_unet_", "lycoris_", "unet.unet.", "unet.", "base_model.model.", "diffusion_model.", "model.diffusion_model.")
_TE_PREFIXES = (
    ("lora_te1_", "lora_te1_"),
    ("lora_te2_", "lora_te2_"),
    ("lora_te_", "lora_te_"),
    ("text_encoder_2.", "lora_te2_"),
    ("text_encoder.", "lora_te1_"),
    ("text_encoders.clip_l.transformer.", "lora_te1_"),  # ComfyUI's own LoRA extraction
    ("text_encoders.clip_g.transformer.", "lora_te2_"),
    ("te1.", "lora_te1_"),
    ("te2.", "lora_te2_"),
)
_TEXT_ENCODER_NAMES = tuple(sorted({canonical for _, canonical in _TE_PREFIXES}))  # lora_te_, lora_te1_, lora_te2_
_RESNET = {"norm1": "in_layers_0", "conv1": "in_layers_2", "norm2": "out_layers_0", "conv2": "out_layers_3",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_BASIC = {"conv_in": "input_blocks_0_0", "time_embedding_linear_1": "time_embed_0",
          "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
          "add_embedding_linear_2": "label_emb_0_2", "class_embedding_linear_1": "label_emb_0_0",
          "class_embedding_linear_2": "label_emb_0_2", "conv_norm_out": "out_0", "conv_out": "out_2"}
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks_\d+_(?:attentions|resnets|downsamplers)_\d+|up_blocks_\d+_(?:attentions|resnets|upsamplers)_\d+|mid_block_(?:attentions|resnets)_\d+)_(.*)$")


@lru_cache(maxsize=8)
def _diffusers_to_sgm(layout: UNetLayout) -> tuple[dict[str, str], dict[str, str]]:
    """Underscored diffusers block prefix -> SGM prefix, and diffusers resnet/sampler module -> SGM module."""
    blocks: dict[str, str] = {}
    modules: dict[str, str] = dict(_BASIC)

    def resnet(diffusers: str, sgm: str) -> None:
        for name, sgm_name in _RESNET.items():
            modules[f"{diffusers}_{name}"] = f"{sgm}_{sgm_name}"

    n = 1
    for level, resnets in enumerate(layout.num_res_blocks):
        for i in range(resnets):
            resnet(f"down_blocks_{level}_resnets_{i}", f"input_blocks_{n}_0")
            blocks[f"down_blocks_{level}_attentions_{i}"] = f"input_blocks_{n}_1"
            n += 1
        modules[f"down_blocks_{level}_downsamplers_0_conv"] = f"input_blocks_{n}_0_op"
        n += 1
    blocks["mid_block_attentions_0"] = "middle_block_1"
    resnet("mid_block_resnets_0", "middle_block_0")
    resnet("mid_block_resnets_1", "middle_block_2")
    out_depths = list(layout.transformer_depth_output)
    n = 0
    for up, level in enumerate(reversed(range(len(layout.channels)))):
        count = layout.num_res_blocks[level] + 1
        for i in range(count):
            resnet(f"up_blocks_{up}_resnets_{i}", f"output_blocks_{n}_0")
            has_attention = out_depths[n] > 0
            blocks[f"up_blocks_{up}_attentions_{i}"] = f"output_blocks_{n}_1"
            if i == count - 1:
                modules[f"up_blocks_{up}_upsamplers_0_conv"] = f"output_blocks_{n}_{2 if has_attention else 1}_conv"
            n += 1
    return blocks, modules


def canonical_name(stem: str, layout: UNetLayout = SDXL) -> str | None:
    """Canonical kohya name for a layer stem as written in a file; None when it is neither UNet nor text encoder.

    >>> canonical_name("unet.unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")
    'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0'
    """
    for prefix, canonical in _TE_PREFIXES:
        if stem.startswith(prefix):
            return canonical + stem[len(prefix):].replace(".", "_")
    body = None
    for prefix in _UNET_PREFIXES:
        if stem.startswith(prefix):
            body = stem[len(prefix):]
            break
    if body is None:
        if not re.match(r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]", stem):
            return None
        body = stem
    # old diffusers attention-processor names: attn1.processor.to_q / attn1.processor.to_out
    body = re.sub(r"\.processor\.(to_q|to_k|to_v)$", r".\1", body)
    body = re.sub(r"\.processor\.to_out(\.0)?$", ".to_out.0", body)
    body = body.replace(".", "_")
    blocks, modules = _diffusers_to_sgm(layout)
    if body in modules:
        body = modules[body]
    else:
        match = _DIFFUSERS_BLOCK.match(body)
        if match and match.group(1) in blocks:
            body = f"{blocks[match.group(1)]}_{match.group(2)}"
        elif match and f"{match.group(1)}_{match.group(2)}" in modules:
            body = modules[f"{match.group(1)}_{match.group(2)}"]
    return "lora_unet_" + body


def is_text_encoder(name: str) -> bool:
    """True for the canonical name of a text-encoder layer (``lora_te1_...``), False for UNet layers."""
    return name.startswith(_TEXT_ENCODER_NAMES)


def sgm_to_canonical(module: str) -> str:
    """``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` -> its canonical kohya name."""
    return "lora_unet_" + module.replace(".", "_")
