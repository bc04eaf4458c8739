"""What each model family's attention linears are, written by hand from the architectures (not from the pack's
table in nodes/adapter/roles.py, which the tests check against this): family -> [(native module regex, role)].

A native module is the model's own path without ``.weight`` (``double_blocks.0.img_attn.qkv``); role None on a
UNet means "the projection's own letter" (``attn1.to_k`` -> ``to_k``).
"""

import re

ROLES = {
    "flux": [(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", "qkv"), (r"double_blocks\.\d+\.(img|txt)_attn\.proj", "to_out"),
             (r"single_blocks\.\d+\.linear1", "qkv+mlp"), (r"single_blocks\.\d+\.linear2", "out+mlp")],
    "sd35": [(r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.qkv", "qkv"),
             (r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.proj", "to_out")],
    "krea2": [(r".*\.attn\.wq", "to_q"), (r".*\.attn\.wk", "to_k"), (r".*\.attn\.wv", "to_v"), (r".*\.attn\.wo", "to_out")],
    "zimage": [(r".*\.attention\.qkv", "qkv"), (r".*\.attention\.out", "to_out")],
    "qwen_image": [(r"transformer_blocks\.\d+\.attn\.(to_q|add_q_proj)", "to_q"),
                   (r"transformer_blocks\.\d+\.attn\.(to_k|add_k_proj)", "to_k"),
                   (r"transformer_blocks\.\d+\.attn\.(to_v|add_v_proj)", "to_v"),
                   (r"transformer_blocks\.\d+\.attn\.(to_out\.0|to_add_out)", "to_out")],
    "unet": [(r".*\.attn[12]\.to_(q|k|v)", None), (r".*\.attn[12]\.to_out\.0", "to_out")],
}
ROLES["flux2"] = ROLES["flux"]
for _wan in ("wan21", "wan22"):
    ROLES[_wan] = [(rf"blocks\.\d+\.(self_attn|cross_attn)\.{name}", role)
                   for name, role in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out"))]
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
