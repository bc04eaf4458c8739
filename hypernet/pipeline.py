"""The merge pipeline: plan every layer (which rule, and why), then compute the planned layers.

Planning decides, per layer name of either LoRA: skipped (an adapter that is no up @ down product, or the
layer policy), claimed by the merge method (its rule, e.g. the hypernet), or left to the layer policy (summed,
or kept from one side). The report and the saved file's metadata come from the plan; computing only
follows it. Which compute branch runs (layer by layer, or same-shape layers together) is decided by
:func:`use_batched`, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .keys import is_text_encoder
from .layers import LowRankLayer, OtherLayer
from .lowrank import weighted_sum
from .methods.base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, kept

LAYER_POLICIES = ("sum", "subject", "style", "skip")


def use_batched(device: torch.device, forced: bool | None = None) -> bool:
    """Same-shape layers through the method together on accelerators, where one kernel launch per layer is
    what costs; layer by layer on the CPU, where stacking only adds copies (bench/merge_bench.py measures
    both: the ``h_per_layer_s`` / ``h_batched_s`` columns). ``forced`` overrides, for tests and the bench."""
    return forced if forced is not None else device.type != "cpu"


@dataclass
class LayerPlan:
    """What happens to one layer: ``action`` (hypernet, summed, kept (subject), kept (style), skipped),
    ``reason`` (one line, empty when the method's own rule needs none), the LoRAs the merged layer comes from
    (``sides``: both, one, or none for a skipped layer), and the inputs to combine."""

    name: str
    action: str
    reason: str = ""
    dtype: torch.dtype = torch.float32  # of the merged factors
    job: LayerJob | None = None  # set when the merge method computes the layer
    parts: list[tuple[LowRankLayer, float]] = field(default_factory=list)  # set when the policy sums/keeps
    sides: tuple[str, ...] = ()


def _sides(subject_layer, style_layer) -> list[tuple[str, object]]:
    return [(side, layer) for side, layer in (("subject", subject_layer), ("style", style_layer)) if layer is not None]


def _generic_reason(name: str, subject_layer, style_layer) -> str:
    if subject_layer is None or style_layer is None:
        return f"only in the {_sides(subject_layer, style_layer)[0][0]} LoRA"
    return "text encoder layer" if is_text_encoder(name) else "not an attention projection"


def _plan_other(name, present, method: MergeMethod, policy: str, weights: dict[str, float], dtype) -> LayerPlan:
    """A layer where one side is an adapter the merge cannot use (DoRA, LoHa, ...): the plain side may stay."""
    reason = "; ".join(f"{layer.kind} adapter in the {side} LoRA cannot be merged"
                       for side, layer in present if isinstance(layer, OtherLayer))
    plain = [(side, layer) for side, layer in present if not isinstance(layer, OtherLayer)]
    if plain and (method.claims_every_layer or policy in ("sum", plain[0][0])):
        side, layer = plain[0]
        return LayerPlan(name, kept(side), reason, dtype, parts=[(layer, weights[side])], sides=(side,))
    return LayerPlan(name, "skipped", reason)


def _plan_policy(name, present, policy: str, reason: str, weights: dict[str, float], dtype) -> LayerPlan:
    """A layer the method declined: the layer policy decides."""
    if policy == "sum":
        action = "summed" if len(present) == 2 else kept(present[0][0])
        return LayerPlan(name, action, reason, dtype, parts=[(layer, weights[side]) for side, layer in present],
                         sides=tuple(side for side, _ in present))
    layer = dict(present).get(policy)
    if layer is not None:
        return LayerPlan(name, kept(policy), reason, dtype, parts=[(layer, weights[policy])], sides=(policy,))
    return LayerPlan(name, "skipped", f"{reason}; layer policy {policy}")


def plan_layer(name: str, subject_layer, style_layer, method: MergeMethod, policy: str,
               weights: dict[str, float], dtype: torch.dtype, ctx: MergeContext) -> LayerPlan:
    """The plan of one layer present in at least one LoRA; ``weights`` maps side -> strength."""
    present = _sides(subject_layer, style_layer)
    if any(isinstance(layer, OtherLayer) for _, layer in present):
        return _plan_other(name, present, method, policy, weights, dtype)
    claim = method.claim(name, subject_layer, style_layer, ctx)
    if isinstance(claim, Claim):
        job = LayerJob(name, subject_layer, style_layer, weights["subject"], weights["style"], dtype, claim.action,
                       claim.sides)
        return LayerPlan(name, claim.action, claim.reason, dtype, job=job, sides=claim.sides)
    return _plan_policy(name, present, policy, claim or _generic_reason(name, subject_layer, style_layer), weights, dtype)


def compute(plans: list[dict[str, LayerPlan]], method: MergeMethod, ctx: MergeContext,
            progress: Callable[[int, int], None] | None = None) -> list[dict[str, MergedLayer]]:
    """Compute every planned layer of every (subject, style) plan, layer name by layer name so a method can
    reuse work across styles (``ctx.memo`` is emptied before each name); with ``ctx.batched`` the method's
    layers are computed together at the end."""
    names = list(dict.fromkeys(name for plan in plans for name in plan))
    results: list[dict[str, MergedLayer]] = [{} for _ in plans]
    deferred: list[tuple[int, LayerPlan]] = []
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names))
        ctx.memo.clear()
        for k, plan in enumerate(plans):
            layer = plan.get(name)
            if layer is None or layer.action == "skipped":
                continue
            if layer.job is None:
                results[k][name] = MergedLayer(weighted_sum(layer.parts, ctx.device, layer.dtype))
            elif ctx.batched:
                deferred.append((k, layer))
            else:
                results[k][name] = method.merge(layer.job, ctx)
    if deferred:
        for (k, layer), merged in zip(deferred, method.merge_batch([layer.job for _, layer in deferred], ctx)):
            results[k][layer.name] = merged
    if progress is not None:
        progress(len(names), len(names))
    return results

