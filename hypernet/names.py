"""What a tensor key, a canonical layer name or a host key-map entry says by itself, with no UNet layout: the layer
stem and role of a LoRA tensor key (``split_key``: up, down, alpha, ...), the attention role of a canonical UNet
layer name, and the model weight a key-map entry patches (``target_key``).

A leaf: nothing of the pack is imported here, so the readers (lora_io.py, model_keys.py, tensors.py), the merge
methods and training take these facts without the layout-aware naming of keys.py, which re-exports them.
"""

from __future__ import annotations

import re

# (tensor-key suffix, role). No suffix is the tail of another, so their order never decides a match
# (tests/unit/test_formats.py checks it); tests/host/test_suffixes_match_comfy.py checks the table against ComfyUI.
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_mid.weight", "mid"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector.weight", "dora_scale"),  # PEFT DoRA
    (".lora_magnitude_vector", "dora_scale"),
    (".diff_b", "bias"),  # a bias difference (ComfyUI's LoRA extraction writes one per biased layer)
    (".lora_B.bias", "bias"),  # PEFT lora_bias
    (".lora_up.bias", "bias"),
)
# The last part of a key naming an adapter that is not an up @ down product: recognised, reported, not merged.
_OTHER_ADAPTER = re.compile(
    r"^(?P<stem>.+)\.(?:(?P<loha>hada_\w+)|(?P<lokr>lokr_\w+)|(?P<oft>oft_\w+)|(?P<boft>boft_\w+)"
    r"|(?P<glora>[ab][12]\.weight)|(?P<diff>diff)|(?P<norm>[wb]_norm)|(?P<set>set_weight)|(?P<reshape>reshape_weight))$")
_OTHER_KINDS = {"loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA", "diff": "full diff",
                "norm": "norm diff", "set": "set weight", "reshape": "reshape"}


def split_key(key: str) -> tuple[str, str] | None:
    """Split a tensor key into (layer stem as written in the file, role); None when it is no LoRA tensor.

    Roles: up, down, mid, alpha, dora_scale, bias, or ``other:<adapter kind>``.
    """
    for suffix, role in FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    match = _OTHER_ADAPTER.match(key)
    if match:
        kind = next(name for name, value in match.groupdict().items() if value and name != "stem")
        return match.group("stem"), f"other:{_OTHER_KINDS[kind]}"
    return None


_ATTENTION = re.compile(r"^lora_unet_.*_(attn[12]?)_(to_q|to_k|to_v|to_out_0)$")
# The roles a linear of an attention block can have (nodes/adapter/roles.py reads them from the model):
# separate projections, q/k/v fused in one linear, or attention fused with the MLP (Flux-style single blocks)
ATTENTION_ROLES = ("to_q", "to_k", "to_v", "to_out", "qkv", "qkv+mlp", "out+mlp")
FUSED_WITH_MLP = ("qkv+mlp", "out+mlp")


def attention_role(name: str) -> str | None:
    """The attention projection a canonical *UNet* layer name is ('to_q', 'to_k', 'to_v', 'to_out'), read from
    the UNet layout's own names (``..._attn1_to_q``); None for other layers.

    For the pack's SDXL-family names without a loaded model (the CLI). With a model, the roles come from the
    model's own modules for every family (nodes/adapter/roles.py; MergeContext.role), never from names.
    """
    match = _ATTENTION.match(name)
    if match:
        return "to_out" if match.group(2) == "to_out_0" else match.group(2)
    return None


def target_key(target) -> str:
    """The model weight key a host key-map entry patches: the entry itself, or the key of ``(key, band)``."""
    return target if isinstance(target, str) else target[0]
