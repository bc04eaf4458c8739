"""Test-only nodes for the pack's end-to-end tests (loaded from devkit/comfy_nodes, never installed for users).

LoraRarTestConditioning: random CONDITIONING shaped for the connected model, in place of a text encoder
(the real T5-XXL / CLIP-G / Qwen / umT5 encoders are gigabytes). The widths are the synthetic DiT family's
(devkit/synthetic_dit.py: ``context_dim``, ``pooled_dim``, ``guidance``), found by the supported-model class
ComfyUI detected for the MODEL: cross_attn (batch, tokens, context_dim), pooled_output (batch, pooled_dim) or None,
guidance 3.5 for Flux dev. tests/host/test_synthetic_dit.py samples every family on them, so a wrong width fails
there in the model's own forward.

None of them needs more keys: ComfyUI derives the rest (Lumina 2's num_tokens, Flux.2's padding to 512
tokens) from cross_attn; pooled_output is None where the model takes no pooled vector. Only torch is imported
at module level (devkit inside the call), so devkit code can use ``random_conditioning`` without ComfyUI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]

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
    """(context_dim, pooled_dim or None, guidance) of a loaded synthetic DiT (a comfy BaseModel): its devkit family
    entry's (devkit/synthetic_dit.py), found by the supported-model class ComfyUI detected, so a new family needs
    nothing here; the synthetic-model tests run each family's forward on them. ValueError for other models."""
    if str(REPO) not in sys.path:  # loaded by a ComfyUI server as a custom node: devkit must import
        sys.path.insert(0, str(REPO))
    from devkit.synthetic_dit import ALL_FAMILIES

    detected = type(model.model_config).__name__
    family = next((family for family in ALL_FAMILIES.values() if family.model_class == detected), None)
    if family is None:
        raise ValueError(f"LoraRarTestConditioning: this {detected} model is none of the synthetic DiT families "
                         f"({', '.join(family.model_class for family in ALL_FAMILIES.values())}; devkit/synthetic_dit.py)")
    return family.context_dim, family.pooled_dim, family.guidance


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
