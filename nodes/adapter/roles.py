"""Which linear of a loaded model is an attention query, key, value or output: read from ComfyUI's own modules.

Methods that treat attention projections apart (K-LoRA switches them per step, LoRA.rar gives the query and
output per-column coefficients) must know each linear's role. Every family spells them differently (Wan's
``self_attn.q``, Krea 2's ``attn.wq``, Z-Image's ``attention.qkv``, Qwen-Image's ``add_q_proj``), so the role is
not read from a name: it comes from the ComfyUI attention module that owns the linear. ``_ROLES_BY_CLASS`` holds one
row per attention class of ComfyUI (its attribute -> role); a subclass inherits its parent's row (Wan's cross
attention is a WanSelfAttention). tests/host/test_attention_roles.py builds each family's model from ComfyUI's
own classes and checks the table against it on every host, and names the attention classes it does not cover.

Roles (hypernet.keys.ATTENTION_ROLES): ``to_q``, ``to_k``, ``to_v``, ``to_out``, ``qkv`` (q, k and v fused in one
linear, as bands of its output rows), and ``qkv+mlp`` / ``out+mlp`` for a Flux-style single block that fuses the
attention with the MLP in one linear. A joint-attention block's text stream (Flux ``txt_attn``, Qwen-Image
``add_q_proj`` ... ``to_add_out``, HiDream ``*_t``) gets the same roles as its image stream: it is attention too.
"""

from __future__ import annotations

import torch

from ...hypernet.model_keys import module_layer_name

# (module under comfy.ldm, class name) -> {attribute path of a linear inside it: role}
_ROLES_BY_CLASS: dict[tuple[str, str], dict[str, str]] = {
    # UNets (SD 1.5, SDXL, KOALA, ...) and DiTs built on the same block (PixArt, ...)
    ("modules.attention", "CrossAttention"): {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"},
    # SD3 / SD3.5 joint blocks (context_block and x_block, attn and attn2)
    ("modules.diffusionmodules.mmdit", "SelfAttention"): {"qkv": "qkv", "proj": "to_out"},
    # Flux.1, Flux.2 / Klein, Chroma: double blocks' img_attn / txt_attn, and the single blocks' fused linears
    ("flux.layers", "SelfAttention"): {"qkv": "qkv", "proj": "to_out"},
    ("flux.layers", "SingleStreamBlock"): {"linear1": "qkv+mlp", "linear2": "out+mlp"},
    # Krea 2: grouped k/v heads (wk / wv narrower than wq), also in the text-fusion blocks
    ("krea2.model", "Attention"): {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out"},
    # Wan 2.1 / 2.2: self_attn, and cross_attn (a subclass; image-to-video adds k_img / v_img)
    ("wan.model", "WanSelfAttention"): {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out",
                                        "k_img": "to_k", "v_img": "to_v"},
    # Lumina 2 and Z-Image: fused q|k|v (k and v bands narrower with grouped heads)
    ("lumina.model", "JointAttention"): {"qkv": "qkv", "out": "to_out"},
    # Qwen-Image: joint attention with the text stream's own projections
    ("qwen_image.model", "Attention"): {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
                                        "add_q_proj": "to_q", "add_k_proj": "to_k", "add_v_proj": "to_v",
                                        "to_add_out": "to_out"},
    # HunyuanVideo's token refiner (its main blocks are Flux's classes above)
    ("hunyuan_video.model", "SelfAttentionRef"): {"qkv": "qkv", "proj": "to_out"},
    # HiDream: image stream and the dual-stream blocks' text stream (*_t)
    ("hidream.model", "HiDreamAttention"): {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out",
                                            "to_q_t": "to_q", "to_k_t": "to_k", "to_v_t": "to_v",
                                            "to_out_t": "to_out"},
}
_LDM = "comfy.ldm."


def attention_classes() -> dict[tuple[str, str], dict[str, str]]:
    """The attention classes this pack knows (a copy): (module under comfy.ldm, class name) -> {attribute: role}."""
    return {key: dict(row) for key, row in _ROLES_BY_CLASS.items()}


def _row(module: torch.nn.Module) -> dict[str, str] | None:
    """The table row of the module's class or of its nearest ancestor class in the table."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(_LDM):
            row = _ROLES_BY_CLASS.get((cls.__module__[len(_LDM):], cls.__name__))
            if row is not None:
                return row
    return None


def _linear(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for part in path.split("."):
        # a node may have emptied or shortened an indexed container (to_out): then there is no linear, no role
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList))
            and int(part) < len(module) else None)
        if module is None:
            return None
    weight = getattr(module, "weight", None)
    return module if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def attention_roles(diffusion_model: torch.nn.Module | None) -> dict[str, str]:
    """Canonical layer name (hypernet.model_keys.module_layer_name, as the LoRAs' layers are named)
    -> role, for every linear an attention module of ``diffusion_model`` owns. Empty when none is known, or
    when the model has no diffusion model module (None: a custom loader's, unet_config
    ``disable_unet_model_creation``; the LoRA read then refuses the files in one line)."""
    roles: dict[str, str] = {}
    if diffusion_model is None:
        return roles
    for path, module in diffusion_model.named_modules():
        row = _row(module)
        if row is None:
            continue
        for attribute, role in row.items():
            if _linear(module, attribute) is not None:
                roles[module_layer_name(f"{path}.{attribute}")] = role
    return roles


def unknown_attention_classes(diffusion_model: torch.nn.Module) -> list[str]:
    """Classes of ComfyUI in the model whose name says attention but which the table does not cover: their linears
    get no role (the merge report names them, the host test expects none in the tested families)."""
    # a block named for attention that owns no linear itself (Wan's WanAttentionBlock holds known attention
    # modules) is no attention class
    names = {f"{type(m).__module__}.{type(m).__name__}" for m in diffusion_model.modules()
             if "attention" in type(m).__name__.lower() and type(m).__module__.startswith(_LDM) and _row(m) is None
             and any(_linear(m, name) is not None for name, _ in m.named_children())}
    return sorted(names)
