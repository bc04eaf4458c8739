"""Test-only nodes for the pack's end-to-end tests (loaded from devkit/comfy_nodes, never installed for users).

LoraRarTestConditioning: random CONDITIONING shaped for the connected model, in place of a text encoder
(the real T5-XXL / CLIP-G / Qwen / umT5 encoders are gigabytes). Widths are read from the MODEL:

    Flux, Flux.2  cross_attn (batch, tokens, context_in_dim), pooled_output (batch, vec_in_dim) when the model has
                  vector_in, guidance 3.5 when guidance_embed (Flux dev)
    SD3           cross_attn (batch, tokens, context_embedder_config.params.in_features),
                  pooled_output (batch, adm_in_channels)
    Krea 2        cross_attn (batch, tokens, txtlayers x txtdim): the text layers side by side, as it unpacks them
    Lumina 2, Z-Image  cross_attn (batch, tokens, cap_feat_dim)
    Qwen-Image, Wan    cross_attn (batch, tokens, in_features of the model's text input linear: txt_in,
                  text_embedding.0), which their detection does not read (the model's defaults, 3584 and 4096)

None of them needs more keys: ComfyUI derives the rest (Lumina 2's num_tokens, Flux.2's padding to 512
tokens) from cross_attn; pooled_output is None where the model takes no pooled vector. Only torch is imported
at module level, so devkit code can use ``random_conditioning`` without ComfyUI.
"""

from __future__ import annotations

import torch

FLUX_GUIDANCE = 3.5  # comfy.model_base.Flux.extra_conds' default


def random_conditioning(context_dim: int, pooled_dim: int | None, guidance: bool, *, batch: int = 1,
                        tokens: int = 8, seed: int = 0) -> list:
    """[[cross_attn (batch, tokens, context_dim), extras]] from a seeded generator (pooled drawn first).

    extras: {"pooled_output": (batch, pooled_dim), or None when pooled_dim is None}, {"guidance": 3.5} when
    guidance. The None is what ComfyUI's text encoders give a family without a pooled vector, and 0.3.75's Flux
    models (Flux.2 included) read the key whatever its value.
    """
    generator = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": None if pooled_dim is None else torch.randn(batch, pooled_dim, generator=generator)}
    if guidance:
        extras["guidance"] = FLUX_GUIDANCE
    return [[torch.randn(batch, tokens, context_dim, generator=generator), extras]]


def conditioning_widths(model) -> tuple[int, int | None, bool]:
    """(context_dim, pooled_dim or None, guidance) of a loaded DiT (a comfy BaseModel); ValueError for others."""
    unet_config = model.model_config.unet_config
    if "context_in_dim" in unet_config:  # Flux family (Flux.2 included)
        return unet_config["context_in_dim"], unet_config.get("vec_in_dim"), bool(unet_config.get("guidance_embed"))
    embedder = unet_config.get("context_embedder_config")
    if embedder is not None:  # SD3 / SD3.5 (MMDiT)
        return embedder["params"]["in_features"], unet_config.get("adm_in_channels"), False
    if "txtlayers" in unet_config:  # Krea 2
        return unet_config["txtlayers"] * unet_config["txtdim"], None, False
    if "cap_feat_dim" in unet_config:  # Lumina 2, Z-Image
        return unet_config["cap_feat_dim"], None, False
    text_input = {"qwen_image": "txt_in", "wan2.1": "text_embedding.0"}.get(unet_config.get("image_model"))
    if text_input is not None:
        return model.diffusion_model.get_submodule(text_input).in_features, None, False
    raise ValueError("LoraRarTestConditioning: this model is none of Flux, SD3, Krea 2, Lumina 2 / Z-Image, "
                     f"Qwen-Image, Wan (its config: {sorted(unet_config)})")


class LoraRarTestConditioning:
    """TEST NODE: seeded random conditioning shaped for the connected DiT model (see the module docstring)."""

    CATEGORY = "LoRA.rar/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "condition"
    DESCRIPTION = "Test only: random conditioning with the widths the connected DiT model expects."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    def condition(self, model, seed, tokens, batch):
        widths = conditioning_widths(model.model)
        return (random_conditioning(*widths, batch=batch, tokens=tokens, seed=seed),)


NODE_CLASS_MAPPINGS = {"LoraRarTestConditioning": LoraRarTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraRarTestConditioning": "LoRA.rar TEST conditioning (tests only)"}
