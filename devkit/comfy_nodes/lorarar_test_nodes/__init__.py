"""Test-only nodes for the pack's end-to-end tests (loaded from devkit/comfy_nodes, never installed for users).

LoraRarTestConditioning: random CONDITIONING shaped for the connected model, in place of a text encoder
(the real T5-XXL / CLIP-G encoders are gigabytes). Widths are read from the MODEL's detected config:

    Flux   cross_attn (batch, tokens, context_in_dim), pooled_output (batch, vec_in_dim), guidance 3.5 when
           guidance_embed (Flux dev)
    SD3    cross_attn (batch, tokens, context_embedder_config.params.in_features),
           pooled_output (batch, adm_in_channels)

Only torch is imported at module level, so devkit code can use ``random_conditioning`` without ComfyUI.
"""

from __future__ import annotations

import torch

FLUX_GUIDANCE = 3.5  # comfy.model_base.Flux.extra_conds' default


def random_conditioning(context_dim: int, pooled_dim: int | None, guidance: bool, *, batch: int = 1,
                        tokens: int = 8, seed: int = 0) -> list:
    """[[cross_attn (batch, tokens, context_dim), extras]] from a seeded generator (pooled drawn first).

    extras: {"pooled_output": (batch, pooled_dim)} when pooled_dim is set, {"guidance": 3.5} when guidance.
    """
    generator = torch.Generator().manual_seed(seed)
    extras = {}
    if pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, pooled_dim, generator=generator)
    if guidance:
        extras["guidance"] = FLUX_GUIDANCE
    return [[torch.randn(batch, tokens, context_dim, generator=generator), extras]]


def conditioning_widths(unet_config: dict) -> tuple[int, int | None, bool]:
    """(context_dim, pooled_dim or None, guidance) of a detected DiT config; ValueError for other families."""
    if "context_in_dim" in unet_config:  # Flux family
        return unet_config["context_in_dim"], unet_config.get("vec_in_dim"), bool(unet_config.get("guidance_embed"))
    embedder = unet_config.get("context_embedder_config")
    if embedder is not None:  # SD3 / SD3.5 (MMDiT)
        return embedder["params"]["in_features"], unet_config.get("adm_in_channels"), False
    raise ValueError("LoraRarTestConditioning: this model is neither Flux nor SD3 (no context_in_dim or "
                     f"context_embedder_config in its config: {sorted(unet_config)})")


class LoraRarTestConditioning:
    """TEST NODE: seeded random conditioning shaped for the connected DiT model (Flux, SD3 / SD3.5)."""

    CATEGORY = "LoRA.rar/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "condition"
    DESCRIPTION = "Test only: random conditioning with the widths the connected Flux or SD3 model expects."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    def condition(self, model, seed, tokens, batch):
        widths = conditioning_widths(model.model.model_config.unet_config)
        return (random_conditioning(*widths, batch=batch, tokens=tokens, seed=seed),)


NODE_CLASS_MAPPINGS = {"LoraRarTestConditioning": LoraRarTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraRarTestConditioning": "LoRA.rar TEST conditioning (tests only)"}
