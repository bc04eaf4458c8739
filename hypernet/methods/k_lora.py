"""k-lora / k-lora-linear: K-LoRA (arXiv 2502.18461), a sampling-time choice between the two LoRAs.

For every attention projection (query, key, value, output, or a fused q/k/v linear; the roles come from the
model's own attention modules, MergeContext.role) present in both LoRAs, each sampling step applies the
subject's update dW_c OR the style's dW_s, never both:

- S_c, S_s: the sum of the k largest |entries| of each update (strength and alpha included), k = r_c * r_s;
- gamma: the mean over layers of L1(dW_c) / L1(dW_s), after dropping ratios >= 3x the mean;
- S(p), p in [0, 1] the sampler's progress (0 at the first step): "linear" alpha * p + beta (k-lora-linear:
  alpha 1.5, beta 0.5), or the current default "s*" (alpha * p + beta) mod alpha (k-lora: beta 1.275);
- the subject when (S_c / gamma) / (S_s * S(p)) > 1, else the style.

S_c, S_s and gamma are computed once per merge, from the factors in slabs of columns (the whole d_out x d_in
update never exists); only S(p) changes with the step. Every other layer follows the layer policy and is
patched statically. The official code's t counts forward calls; here p is the sampler's progress (the
ComfyUI side, nodes/adapter/branch.py, derives it from the current sigma), so any sampler and step count
gives the same choice at the same point of the schedule. The schedule is the part being sampled: with
denoise < 1, and in each stage of a KSamplerAdvanced split, p runs from 0 to 1 through that part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoraRarError
from ..layers import LowRankLayer
from ..lowrank import weighted_sum
from ..names import FUSED_WITH_MLP
from . import register
from ..runtime import FactorCache, RuntimeBranch, RuntimePart, low_rank_apply, schedule_progress  # noqa: F401 (public here too)
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param

PATTERNS = ("s*", "linear")
OUTLIER_FACTOR = 3.0  # ratios at least this many times the mean are left out of gamma (the published rule)
SLAB_COLUMNS = 256  # input columns of dW formed at once for top-k and L1: d_out x 256, far below any d_out x d_in


def top_k_and_l1(layer: LowRankLayer, k: int, device=None, columns: int = SLAB_COLUMNS) -> tuple[float, float]:
    """(sum of the k largest |entries|, sum of all |entries|) of dW = scale * up @ down, exact.

    dW is formed ``columns`` input columns at a time, keeping a running top-k, so memory is
    O(d_out * columns + k), never d_out x d_in. float32 products, float64 sums.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    up = layer.up.to(device, torch.float32).flatten(1) * layer.scale
    down = layer.down.to(device, torch.float32).flatten(1)
    k = min(k, layer.d_out * layer.d_in)
    largest = torch.empty(0, device=device)
    l1 = 0.0
    for start in range(0, layer.d_in, columns):
        block = (up @ down[:, start:start + columns]).abs_().flatten()
        l1 += float(block.sum(dtype=torch.float64))
        candidates = torch.cat([largest, block])
        largest = torch.topk(candidates, min(k, candidates.numel()), sorted=False).values
    return float(largest.sum(dtype=torch.float64)), l1


def gamma_of(ratios: list[float]) -> float:
    """The mean of L1(dW_c) / L1(dW_s) over layers, after dropping ratios >= 3x the mean (outlier layers)."""
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [ratio for ratio in ratios if ratio < OUTLIER_FACTOR * mean]
    return sum(kept) / len(kept) if kept else mean


def time_scale(p: float, pattern: str, alpha: float, beta: float) -> float:
    """S(p): "linear" alpha * p + beta, or "s*" (alpha * p + beta) mod alpha."""
    value = alpha * p + beta
    return value % alpha if pattern == "s*" else value


@dataclass(frozen=True)
class SwitchedLayer:
    """A layer merged at sampling time: each step applies the subject's OR the style's update, never a sum.

    subject, style: the two sides with their strengths folded in (scale 1); subject_score, style_score: the
    numbers the rule compares (the method's :meth:`KLoraMethod.side_scores`: K-LoRA's sums of the top-k absolute
    entries of each update, EST-LoRA's squared Frobenius norms).
    """

    subject: LowRankLayer
    style: LowRankLayer
    subject_score: float
    style_score: float
    subject_l1: float  # sum of |entries| of each side's update, for gamma (the layers' L1 ratio)
    style_l1: float


@dataclass(frozen=True, eq=False)
class KLoraSwitch(RuntimePart):
    """The sampling-time part of a K-LoRA merge: the switched layers, gamma and the time scaling.

    layers: layer name -> SwitchedLayer (each side's factors with its strength folded in, S_c and S_s); method: the
    name of the method whose scores these are, as its messages say it ("k-lora", "est-lora").
    """

    layers: dict[str, SwitchedLayer]
    gamma: float
    pattern: str
    alpha: float
    beta: float
    method: str = "k-lora"

    def scale(self, p: float) -> float:
        return time_scale(p, self.pattern, self.alpha, self.beta)

    def choose(self, p: float) -> dict[str, str]:
        """Layer -> "subject" or "style" at progress p (0: first step, 1: end)."""
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise LoraRarError(f"{self.method} progress {p!r}: must be between 0 and 1")
        scale = self.scale(p)
        # (S_c / gamma) / (S_s * S(p)) > 1, multiplied out (gamma > 0 or 0): S_s * S(p) = 0 picks the subject,
        # gamma = 0 (every subject update is zero, e.g. subject strength 0) the style, without dividing by 0
        return {name: "subject" if layer.subject_score > layer.style_score * scale * self.gamma else "style"
                for name, layer in self.layers.items()}

    def summary(self) -> dict:
        """What the report shows: layers switched, gamma, and how many pick the subject at p = 0, 0.5, 1."""
        subject_at = {f"{p:g}": sum(side == "subject" for side in self.choose(p).values()) for p in (0.0, 0.5, 1.0)}
        return {"switched_layers": len(self.layers), "gamma": self.gamma, "pattern": self.pattern,
                "subject_layers_at_progress": subject_at}

    def summary_line(self) -> str:
        summary = self.summary()
        chosen = ", ".join(f"p={p}: {n}" for p, n in summary["subject_layers_at_progress"].items())
        return (f"sampling time: {summary['switched_layers']} layers switched per step, gamma {self.gamma:.4g}, "
                f"{self.pattern} scaling; layers on the subject at progress {chosen}")

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def updates(self, name: str) -> list[tuple[str, LowRankLayer]]:
        layer = self.layers[name]  # one side at a time, never both
        return [("subject", layer.subject), ("style", layer.style)]

    def branch(self) -> "KLoraBranch":
        return KLoraBranch(self)


@dataclass(eq=False)
class KLoraBranch(RuntimeBranch):
    """One patched model's K-LoRA: every switched layer adds the side chosen at the sampler's current progress."""

    switch: KLoraSwitch
    p: float = 0.0
    choice: dict = field(default_factory=dict)
    factors: FactorCache = field(default_factory=FactorCache)
    follows_sampling = True

    def __post_init__(self):
        self.choice = self.switch.choose(0.0)  # a forward outside sampling (no progress yet) gets the first step's

    def layer_names(self) -> list[str]:
        return list(self.switch.layers)

    def misfit(self, name, weight_shape, bias_shape) -> str | None:
        return self.switch.layers[name].subject.misfit(weight_shape, bias_shape)

    def at_progress(self, p: float) -> None:
        if p != self.p:
            self.p, self.choice = p, self.switch.choose(p)

    def extra(self, name: str, x: torch.Tensor) -> torch.Tensor:
        side = self.choice[name]
        layer = getattr(self.switch.layers[name], side)
        return low_rank_apply(x, self.factors.get((name, side), layer, x.device, x.dtype))


class KLoraMethod(MergeMethod):
    name = "k-lora"
    since, position = "0.2.0", 3
    pattern = "s*"
    help = ("K-LoRA: per attention layer and sampling step, the subject's or the style's update (top-K rule, "
            "current s* time scaling); sampling-time only, cannot be saved as one file")
    params = (Param("alpha", 1.5, 0.01, 10.0, "time-scaling slope: S(p) = (alpha * p + beta) mod alpha"),
              Param("beta", 1.275, 0.0, 10.0, "time-scaling offset (the published s* default 1.275)"))
    sampling_time = True
    unsavable = "chooses per step at sampling time"
    needs_roles = True
    switch_reason = "K-LoRA: the subject or the style, chosen per sampling step"  # the report's line per switched layer
    score_name = "top-k sums"  # what side_scores gives, as an error names it

    def side_scores(self, layer: LowRankLayer, k: int, device) -> tuple[float, float]:
        """(the score the rule compares, the L1 norm for gamma) of one side's update, strength folded in; k = r_c * r_s.
        K-LoRA's score: the sum of the k largest |entries|."""
        return top_k_and_l1(layer, k, device)

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | str | None:
        role = ctx.role(name)
        if subject is None or style is None or role is None:
            return None
        if role in FUSED_WITH_MLP:  # one linear holds attention and MLP rows: a per-step choice would switch both
            return "attention fused with the MLP in one linear (single block): see docs/METHODS.md"
        return Claim("switched", self.switch_reason)

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        subject = weighted_sum([(job.subject, job.subject_weight)], ctx.device, job.dtype)
        style = weighted_sum([(job.style, job.style_weight)], ctx.device, job.dtype)
        k = job.subject.rank * job.style.rank
        subject_score, subject_l1 = self.side_scores(subject, k, ctx.device)
        style_score, style_l1 = self.side_scores(style, k, ctx.device)
        if not all(map(math.isfinite, (subject_score, style_score, subject_l1, style_l1))):
            raise LoraRarError(f"layer {job.name}: {self.name}'s {self.score_name} or L1 norms are not finite "
                               f"(subject {subject_score:.3g}, L1 {subject_l1:.3g}; style {style_score:.3g}, L1 "
                               f"{style_l1:.3g}); the files' values or the strengths are too large")
        return MergedLayer(None, runtime=SwitchedLayer(subject, style, subject_score, style_score, subject_l1,
                                                       style_l1))

    def finish(self, runtime: dict[str, SwitchedLayer], params: dict[str, float]) -> KLoraSwitch | None:
        if not runtime:
            return None
        # a layer whose style update is zero (style strength 0) has no ratio; its choice is the subject anyway
        ratios = [layer.subject_l1 / layer.style_l1 for layer in runtime.values() if layer.style_l1 > 0]
        return KLoraSwitch(dict(runtime), gamma_of(ratios), self.pattern, params["alpha"], params["beta"], self.name)


class KLoraLinearMethod(KLoraMethod):
    name = "k-lora-linear"
    position = 4
    pattern = "linear"
    help = ("K-LoRA with the paper's first, linear time scaling S(p) = alpha * p + beta; sampling-time only, "
            "cannot be saved as one file")
    params = (Param("alpha", 1.5, 0.01, 10.0, "time-scaling slope: S(p) = alpha * p + beta"),
              Param("beta", 0.5, 0.0, 10.0, "time-scaling offset (the paper's 0.5)"))


register(KLoraMethod())
register(KLoraLinearMethod())
