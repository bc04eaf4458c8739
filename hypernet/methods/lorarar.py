"""lorarar: the LoRA.rar rule (arXiv 2412.05148), per UNet attention projection present in both LoRAs.

- to_q, to_out.0: H reads [dW_subject[:, j] ; dW_style[:, j]] for every input column j and returns
  (m_subject[j], m_style[j]); merged dW = a * m_subject * dW_subject + b * m_style * dW_style (column scaling,
  strengths a and b; 1 and 1 give the published rule exactly).
- to_k, to_v: merged dW = a * dW_subject + b * dW_style (the published code sums them).
H's first layer is linear, so its hidden layer is computed from the factors,
W_in @ [dW_s; dW_t] = (W_subject @ up_s) @ down_s + (W_style @ up_t) @ down_t, and the merged update is a
LoRA of rank r_subject + r_style: up = [up_s | up_t], down = [down_s * m_s ; down_t * m_t].
No dense d_out x d_in update is ever formed.
"""

from __future__ import annotations

import torch

from ..errors import LoraRarError
from ..layers import LowRankLayer
from ..lowrank import weighted_sum
from ..model import LoraRarHypernet, shown_model_classes
from ..names import FUSED_WITH_MLP
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod

# The layers H serves: the attention projections whose input columns it scales. The merge's claim, training's choice
# of the layers H gets coefficients for, and the dataset checks all read this one rule.
HYPERNET_ROLES = ("to_q", "to_out")
# The attention projections summed instead (coefficients fixed at 1), with the reason the report gives.
SUMMED_ROLES = {
    "to_k": "to_k/to_v (the published rule sums them)",
    "to_v": "to_k/to_v (the published rule sums them)",
    # one column coefficient would scale the k and v rows too, which the rule sums
    "qkv": "fused q/k/v of a DiT block (summed like to_k/to_v; see docs/METHODS.md)",
}


class FactoredHypernet:
    """H's layers in float32 on the merge device, the input layer split into subject and style halves.

    Built once per merge call, so the per-layer loop converts no hypernet weight (H may still be training
    elsewhere: nothing is cached across calls).
    """

    def __init__(self, hypernet: LoraRarHypernet, device: torch.device):
        self.hypernet, self.device = hypernet, device
        out = hypernet.output[1]
        self.out_weight_t = out.weight.to(device, torch.float32).T  # (hidden, 2)
        self.out_bias = out.bias.to(device, torch.float32)
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def input_halves(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_subject (hidden, width), W_style (hidden, width), bias (hidden, 1)) for attention width ``width``."""
        if width not in self._inputs:
            layer = self.hypernet.input_layer(width)
            if layer is None:
                raise LoraRarError(f"hypernet has no input layer for attention width {width}")
            weight = layer.weight.to(self.device, torch.float32)
            self._inputs[width] = (weight[:, :width], weight[:, width:], layer.bias.to(self.device, torch.float32)[:, None])
        return self._inputs[width]

    def side_product(self, half: torch.Tensor, layer: LowRankLayer) -> torch.Tensor:
        """(hidden, rank) = scale * W_half @ up: the small factor the hidden layer needs from one LoRA."""
        # the scale multiplies the small product, not the (rank, d_in) factor
        return (half @ layer.up.to(self.device, torch.float32)).mul_(layer.scale)

    def subject_hidden(self, subject: LowRankLayer) -> torch.Tensor:
        """(hidden, d_in) = bias + W_subject @ dW_subject: the subject's share of H's hidden layer, reusable."""
        w_subject, _, bias = self.input_halves(subject.d_out)
        return torch.addmm(bias, self.side_product(w_subject, subject), subject.down.to(self.device, torch.float32))

    def coefficients(self, subject_hidden: torch.Tensor, style: LowRankLayer) -> torch.Tensor:
        """(d_in, 2) column coefficients from the subject's share of the hidden layer and the style's factors."""
        _, w_style, _ = self.input_halves(style.d_out)
        hidden = torch.addmm(subject_hidden, self.side_product(w_style, style), style.down.to(self.device, torch.float32))
        return torch.addmm(self.out_bias, hidden.relu_().T, self.out_weight_t)


@torch.no_grad()
def lorarar_coefficients(hypernet: LoraRarHypernet, subject: LowRankLayer, style: LowRankLayer, device=None) -> torch.Tensor:
    """Column coefficients (d_in, 2) = H([dW_subject ; dW_style]) computed from the factors.

    Cost O(hidden * d_out * (r_s + r_t) + hidden * (r_s + r_t) * d_in): never d_out x d_in.
    """
    layer = hypernet.input_layer(subject.d_out)
    if layer is None:
        raise LoraRarError(f"hypernet has no input layer for attention width {subject.d_out}")
    factored = FactoredHypernet(hypernet, torch.device(device) if device is not None else layer.weight.device)
    return factored.coefficients(factored.subject_hidden(subject), style)


@torch.no_grad()
def lorarar_coefficients_batched(hypernet: LoraRarHypernet, pairs: list[tuple[LowRankLayer, LowRankLayer]],
                                 device=None) -> list[torch.Tensor]:
    """lorarar_coefficients for many layer pairs, layers of the same shapes stacked through H in one call.

    Stacking copies the factors and holds a (layers, hidden, d_in) hidden layer: on a 2-core CPU it is
    slower than the per-layer loop (bench/merge_bench.py measures both), so the pipeline uses it only on
    accelerators (hypernet.pipeline.use_batched), where one kernel launch per layer is what costs.
    """
    if not pairs:
        return []
    device = torch.device(device) if device is not None else torch.device("cpu")
    factored = FactoredHypernet(hypernet, device)
    groups: dict[tuple, list[int]] = {}
    for index, (subject, style) in enumerate(pairs):
        key = (subject.d_out, subject.d_in, subject.rank, style.rank)
        groups.setdefault(key, []).append(index)
    results: list[torch.Tensor | None] = [None] * len(pairs)
    for (width, _, _, _), indices in groups.items():
        w_subject, w_style, bias = factored.input_halves(width)
        hidden = None
        for side, half in ((0, w_subject), (1, w_style)):
            layers = [pairs[i][side] for i in indices]
            # (hidden, n * rank) in one product, then per layer (n, hidden, rank) with each layer's scale
            ups = torch.cat([layer.up.to(device, torch.float32) for layer in layers], dim=1)
            products = (half @ ups).view(half.shape[0], len(layers), -1).transpose(0, 1)
            products = products * torch.tensor([layer.scale for layer in layers], device=device)[:, None, None]
            downs = torch.stack([layer.down.to(device, torch.float32) for layer in layers])
            hidden = torch.baddbmm(bias, products, downs) if hidden is None else hidden.baddbmm_(products, downs)
        coefficients = torch.baddbmm(factored.out_bias, hidden.relu_().transpose(1, 2), factored.out_weight_t.expand(len(indices), -1, -1))
        for position, index in enumerate(indices):
            results[index] = coefficients[position]
    return results


class LoraRarMethod(MergeMethod):
    name = "lorarar"
    since, position = "0.1.0", 1
    help = "the hypernetwork merge: per-column subject and style coefficients for to_q/to_out.0, to_k/to_v summed"
    needs_hypernet = True
    needs_roles = True

    def unsupported(self, ctx: MergeContext) -> str | None:
        """A model that is no UNet (Flux, SD3, ...) needs a hypernet whose file says it was trained for it."""
        trained_for = getattr(ctx.hypernet, "model_classes", ())
        if ctx.layout is not None or ctx.family is None or ctx.family in trained_for:
            return None
        family = ctx.family
        return (f"no LoRA.rar hypernet for {family} models: the published ones serve SDXL and KOALA-700M UNets"
                + (f", and this one says it was trained for {shown_model_classes(trained_for)}" if trained_for else "")
                + f"; a hypernet for {family} must be trained first (README: 'Other model families'); "
                "use direct, np-lora or k-lora meanwhile")

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | str | None:
        role = ctx.role(name)
        if subject is None or style is None or role is None:
            return None
        if role in FUSED_WITH_MLP:
            return "attention fused with the MLP in one linear (single block): the published rule has no such layer"
        if role in SUMMED_ROLES:
            return Claim("summed", SUMMED_ROLES[role])
        if role not in HYPERNET_ROLES:
            return None
        if ctx.hypernet.input_layer(subject.d_out) is None:
            return f"width {subject.d_out}: the hypernet has no input layer for it"
        return Claim("hypernet")

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        if job.action != "hypernet":
            return MergedLayer(weighted_sum([(job.subject, job.subject_weight), (job.style, job.style_weight)],
                                            ctx.device, job.dtype))
        factored = _factored(ctx)
        if "subject_hidden" not in ctx.memo:  # the same subject layer for every style of this layer
            ctx.memo["subject_hidden"] = factored.subject_hidden(job.subject)
        return _scaled(job, factored.coefficients(ctx.memo["subject_hidden"], job.style), ctx)

    def merge_batch(self, jobs: list[LayerJob], ctx: MergeContext) -> list[MergedLayer]:
        """Hypernet layers of the same shapes go through H stacked (accelerators: one launch, not one per layer)."""
        hypernet_jobs = [job for job in jobs if job.action == "hypernet"]
        coefficients = lorarar_coefficients_batched(ctx.hypernet, [(job.subject, job.style) for job in hypernet_jobs],
                                                    ctx.device)
        by_job = {id(job): c for job, c in zip(hypernet_jobs, coefficients)}
        return [_scaled(job, by_job[id(job)], ctx) if id(job) in by_job else self.merge(job, ctx) for job in jobs]


def _factored(ctx: MergeContext) -> FactoredHypernet:
    """H converted once per merge call (kept in the context, not across calls: H may be training elsewhere)."""
    if "lorarar" not in ctx.state:
        ctx.state["lorarar"] = FactoredHypernet(ctx.hypernet, ctx.device)
    return ctx.state["lorarar"]


def _scaled(job: LayerJob, coefficients: torch.Tensor, ctx: MergeContext) -> MergedLayer:
    """[up_s | up_t], [down_s * m_s * a ; down_t * m_t * b] from a layer's (d_in, 2) coefficients."""
    layer = weighted_sum([(job.subject, coefficients[:, 0] * job.subject_weight, job.subject_weight),
                          (job.style, coefficients[:, 1] * job.style_weight, job.style_weight)], ctx.device, job.dtype)
    return MergedLayer(layer, coefficients)


register(LoraRarMethod())
