"""What each model family's attention linears are, written by hand from the architectures (not from the pack's
table in nodes/adapter/roles.py, which the tests check against this): family -> [(native module regex, role)].
A DiT family's are its devkit entry's ``roles`` (devkit/synthetic_dit.py); the UNets' are written here.

A native module is the model's own path without ``.weight`` (``double_blocks.0.img_attn.qkv``); role None on a
UNet means "the projection's own letter" (``attn1.to_k`` -> ``to_k``).
"""

import re

from devkit.synthetic_dit import ALL_FAMILIES

ROLES = {name: list(family.roles) for name, family in ALL_FAMILIES.items()}
ROLES["unet"] = [(r".*\.attn[12]\.to_(q|k|v)", None), (r".*\.attn[12]\.to_out\.0", "to_out")]
FUSED_WITH_MLP = ("qkv+mlp", "out+mlp")


def role_of(family: str, native: str) -> str | None:
    """The role of a native module (``.weight`` allowed) of the family, or None."""
    native = native.removesuffix(".weight")
    for pattern, role in ROLES[family]:
        if re.fullmatch(pattern, native):
            return role or "to_" + native[-1]
    return None


def is_switched(family: str, native: str) -> bool:
    """Whether K-LoRA chooses this linear per step: an attention projection, not attention fused with the MLP."""
    role = role_of(family, native)
    return role is not None and role not in FUSED_WITH_MLP


def canonical(native: str) -> str:
    """``double_blocks.0.img_attn.qkv(.weight)`` -> its kohya layer name ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + native.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")


# The linears test LoRAs train on the families whose widths the host fixes (Z-Image 3840, Qwen-Image 3072): one
# block's fused and separate attention projections, a text-stream one and an MLP linear cover every kind of layer
# there, while a dense float64 golden of every linear would take gigabytes. None: every linear (narrow models).
WIDE_MODULES = {
    "zimage": ("layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w2"),
    "qwen_image": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.img_mlp.net.2"),
}


def lora_modules(family: str):
    """The native linears a test LoRA of the family trains (``random_dit_lora(modules=...)``); None: all."""
    return WIDE_MODULES.get(family)
