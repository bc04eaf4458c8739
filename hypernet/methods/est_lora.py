"""est-lora: EST-LoRA (arXiv 2508.02165), K-LoRA's per-step choice scored by each update's energy.

For every attention projection present in both LoRAs (the layers K-LoRA switches), each sampling step applies
the subject's update dW_c OR the style's dW_s, never both:

- E_c, E_s: the squared Frobenius norm of each update, strength and alpha included;
- gamma: as K-LoRA's, the mean over layers of L1(dW_c) / L1(dW_s) after dropping ratios >= 3x the mean;
- s(p) = (alpha * p + beta) mod alpha (the "s*" wrap), alpha 1.5, beta 1.275: the official Flux script's values;
- the subject when E_c / gamma > s(p) * E_s, else the style.

Everything but the score is K-LoRA's (hypernet/methods/k_lora.py): the claim, gamma, s(p), the switch that
chooses and the branch that applies the choice, with p the sampler's progress. The official code forms
B A densely on every call; here ||B A||_F^2 = trace((B^T B)(A A^T)) comes from the r x r Gram matrices of the
factors in float64, and the L1 norms for gamma from K-LoRA's slabs of columns, so no d_out x d_in update
exists. The official SDXL script sets beta from DINO instead (docs/METHODS.md, "EST-LoRA"); here beta is a
parameter.
"""

from __future__ import annotations

import torch

from ..layers import LowRankLayer
from . import register
from .base import Param
from .k_lora import KLoraMethod, top_k_and_l1


def frobenius_energy(layer: LowRankLayer, device=None) -> float:
    """||scale * up @ down||_F^2 = scale^2 * trace((up^T up)(down down^T)), exact, in float64.

    Both Gram matrices are rank x rank and symmetric, so the trace is the sum of their elementwise product:
    O((d_out + d_in) * rank^2) work, never a d_out x d_in tensor.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    up = layer.up.to(device, torch.float64).flatten(1)
    down = layer.down.to(device, torch.float64).flatten(1)
    return float(layer.scale) ** 2 * float(((up.T @ up) * (down @ down.T)).sum())


class EstLoraMethod(KLoraMethod):
    name = "est-lora"
    since, position = "0.2.0", 6
    pattern = "s*"
    help = ("EST-LoRA: per attention layer and sampling step, the subject's or the style's update, whichever has "
            "more energy (squared Frobenius norm; the subject's divided by gamma, the style's times s(p)); "
            "sampling-time only, cannot be saved as one file. beta: the official Flux script's 1.275; the "
            "official SDXL script derives it from DINO (see docs/METHODS.md)")
    params = (Param("alpha", 1.5, 0.01, 10.0, "time-scaling slope: s(p) = (alpha * p + beta) mod alpha"),
              Param("beta", 1.275, 0.0, 10.0,
                    "time-scaling offset: 1.275 as the official Flux script; the official SDXL script uses "
                    "1 - cos(DINO ViT-S/16 CLS features of an image made with the subject LoRA alone, of one made "
                    "with the style LoRA alone) with s(p) = alpha * p + beta, unwrapped"))
    switch_reason = "EST-LoRA: the subject or the style, chosen per sampling step by update energy"
    score_name = "squared Frobenius norms"

    def side_scores(self, layer: LowRankLayer, k: int, device) -> tuple[float, float]:
        """(||dW||_F^2, L1(dW)) of one side's update; k (K-LoRA's top-k size) is not used by this rule."""
        _, l1 = top_k_and_l1(layer, 1, device)  # K-LoRA's slab routine; k = 1 keeps its running top-k trivial
        return frobenius_energy(layer, device), l1


register(EstLoraMethod())
