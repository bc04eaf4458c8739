"""Merging a subject LoRA and a style LoRA into one low-rank LoRA: the public entry points.

``merge_loras`` / ``merge_many`` check the request, plan every layer and compute it through the pipeline
(hypernet/pipeline.py) with a merge method from the registry (hypernet/methods/: ``lorarar``, ``direct``, ...),
then check the result (finite, no float32 overflow) and describe it (``MergeReport``, file metadata; the result
types are hypernet/result.py's, exported here too).
Strengths scale each LoRA's contribution: with strengths (a, b) a method's merged update uses a * dW_subject
and b * dW_style; strengths 1 and 1 give each published rule exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import methods
from .base_models import UNetLayout
from .calibration import Calibration
from .coefficients import summarize
from .errors import LoraRarError
from .keys import FUSED_WITH_MLP
from .layers import LoraFile, LowRankLayer, OtherLayer
from .lowrank import update_bound
from .methods import MergeContext, MergedLayer, MergeMethod, resolve_params
from .model import LoraRarHypernet
from .pipeline import LAYER_POLICIES, LayerPlan, compute, plan_layer, use_batched
from .result import (STRENGTH_LIMIT, MergedLora, MergeReport, Strengths, new_report,  # noqa: F401  (public here too)
                     source_paths)

LAYER_POLICY_HELP = (
    "Layers LoRA.rar does not cover (non-attention layers, text encoders, layers in only one LoRA, "
    "widths the hypernet has no input for): sum = strength-weighted sum kept low-rank (default); "
    "subject / style = keep only that LoRA's layer; skip = leave the layer out. "
    "DoRA/LoHa/LoKr layers are never merged and are listed in the report."
)

_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_compatible(subject: LoraFile, style: LoraFile, layout: UNetLayout | None) -> None:
    """Refuse pairs made for different base models, or for another base model than ``layout`` (the layout the
    LoRAs must fit: the node's model's, the CLI's --base)."""
    subject_ctx, style_ctx = subject.context_dims(), style.context_dims()
    if subject_ctx and style_ctx and subject_ctx != style_ctx:
        raise LoraRarError(
            f"{subject.name} (text context {sorted(subject_ctx)}) and {style.name} (text context "
            f"{sorted(style_ctx)}) are LoRAs for different base models")
    if layout is not None:
        for lora in (subject, style):
            ctx = lora.context_dims()
            if ctx and ctx != {layout.context_dim}:
                raise LoraRarError(
                    f"{lora.path}: cross-attention reads a {sorted(ctx)[0]}-wide text context, but {layout.name} "
                    f"uses {layout.context_dim}: this LoRA is for another base model (SD1.5 uses 768)")


def merge_loras(
    subject: LoraFile,
    style: LoraFile,
    hypernet: LoraRarHypernet | None,
    method: str = "lorarar",
    policy: str = "sum",
    strengths: Strengths = Strengths(),
    layout: UNetLayout | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    params: dict[str, float] | None = None,
    batched: bool | None = None,
    family: str | None = None,
    roles: dict[str, str] | None = None,
    calibration: Calibration | None = None,
) -> MergedLora:
    """Merge two LoRAs layer by layer; the result's layers are low-rank (rank r_subject + r_style at most).

    device: where the method's math runs (the model's device); dtype: of the merged factors (default: the
    inputs' common type, float32 when they differ); progress(done, total) is called per layer; params and
    batched, family, roles, calibration: see :func:`merge_many`.
    """
    return merge_many(subject, [style], hypernet, method, policy, strengths, layout, device, dtype, progress,
                      params, batched, family, roles, calibration)[0]


def _merged_dtype(subject: LoraFile, style: LoraFile) -> torch.dtype:
    dtypes = {layer.up.dtype for lora in (subject, style) for layer in lora.layers.values() if isinstance(layer, LowRankLayer)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@torch.no_grad()
def merge_many(
    subject: LoraFile,
    styles: list[LoraFile],
    hypernet: LoraRarHypernet | None,
    method: str = "lorarar",
    policy: str = "sum",
    strengths: Strengths = Strengths(),
    layout: UNetLayout | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    params: dict[str, float] | None = None,
    batched: bool | None = None,
    family: str | None = None,
    roles: dict[str, str] | None = None,
    calibration: Calibration | None = None,
) -> list[MergedLora]:
    """One subject merged with each of several styles: ``merge_loras(subject, style)`` for every style.

    Layer by layer, a method may reuse the subject's share of its work for every style (LoRA.rar computes
    bias + W_subject @ dW_subject once), so n styles cost about (n + 1) / 2n of n separate merges' H work.
    params: the method's own parameters by name (defaults otherwise); batched: force the compute branch
    (default: :func:`hypernet.pipeline.use_batched`). progress(done, total) counts layers of all inputs.
    family: the model family (ComfyUI's class name, e.g. "Flux"), for methods that serve only some families.
    roles: canonical layer name -> attention role, read from the loaded model (nodes/adapter/roles.py); None
    without a model, when the UNet layout's names say it. calibration: the model and data a data-driven method
    (``needs_model``) runs through before it merges (hypernet/calibration.py); such a method is refused without it.
    """
    rule = _checked_method(method, policy, hypernet, styles)
    for style in styles:
        check_compatible(subject, style, layout)
    device = torch.device(device) if device is not None else torch.device("cpu")
    ctx = MergeContext(hypernet, device, layout, resolve_params(rule, params), use_batched(device, batched),
                       family=family, roles=roles, calibration=calibration)
    why = rule.unsupported(ctx) or _no_attention(rule, ctx) or _no_model(rule, ctx)
    if why:
        raise LoraRarError(f"{rule.name}: {why}")
    plans = [_plan(subject, style, rule, policy, strengths, dtype or _merged_dtype(subject, style), ctx)
             for style in styles]
    if rule.needs_model:  # data-driven: the model runs once per pair before anything is merged
        for plan in plans:
            rule.calibrate([layer.job for layer in plan.values() if layer.job is not None], ctx)
    computed = compute(plans, rule, ctx, progress)
    return [_result(subject, style, hypernet, rule, policy, strengths, ctx.params, plan, layers)
            for style, plan, layers in zip(styles, plans, computed)]


def _no_attention(rule: MergeMethod, ctx: MergeContext) -> str | None:
    """Why a method whose rule is for attention projections cannot run on a model in which none is known (its
    attention classes are not in the pack's table, nodes/adapter/roles.py): it would only apply the layer policy."""
    if not rule.needs_roles or ctx.roles is None or any(role not in FUSED_WITH_MLP for role in ctx.roles.values()):
        return None
    return (f"no attention projection is known in this {ctx.family + ' ' if ctx.family else ''}model (the pack reads them from "
            f"ComfyUI's attention classes, and none of this model's is known): {rule.name} would only sum the LoRAs; "
            "use direct or np-lora")


def _no_model(rule: MergeMethod, ctx: MergeContext) -> str | None:
    """Why a data-driven method cannot run: it merges from what the model does, and no model was given."""
    if not rule.needs_model or ctx.calibration is not None:
        return None
    return ("it runs the model before it merges, and only the LoRA files were given (no model to run); merge in "
            "ComfyUI, or choose a method that merges from the files alone")


def _checked_method(method: str, policy: str, hypernet, styles) -> MergeMethod:
    rule = methods.get(method)
    if policy not in LAYER_POLICIES:
        raise LoraRarError(f"unknown layer policy {policy!r}; choose one of {', '.join(LAYER_POLICIES)}")
    if rule.needs_hypernet and hypernet is None:
        raise LoraRarError(f"method {method} needs a hypernet")
    if not styles:
        raise LoraRarError("merge_many needs at least one style LoRA")
    return rule


def _plan(subject: LoraFile, style: LoraFile, rule: MergeMethod, policy: str, strengths: Strengths,
          dtype: torch.dtype, ctx: MergeContext) -> dict[str, LayerPlan]:
    """Every layer of either LoRA, in the order subject's then style's, with what will happen to it."""
    plans = {}
    for name in dict.fromkeys([*subject.layers, *style.layers]):
        s_layer, t_layer = subject.layers.get(name), style.layers.get(name)
        if not isinstance(s_layer, OtherLayer) and not isinstance(t_layer, OtherLayer):
            _check_same_shape(name, s_layer, t_layer, subject, style)
        s_weight, t_weight = strengths.for_layer(name)
        plans[name] = plan_layer(name, s_layer, t_layer, rule, policy, {"subject": s_weight, "style": t_weight}, dtype, ctx)
    return plans


def _result(subject: LoraFile, style: LoraFile, hypernet, rule: MergeMethod, policy: str, strengths: Strengths,
            params: dict[str, float], plan: dict[str, LayerPlan], computed: dict[str, MergedLayer]) -> MergedLora:
    """The merged LoRA of one (subject, style) pair, its report made from the plan."""
    described = None
    if rule.needs_hypernet:
        described = f"{hypernet.source} (sha256 {hypernet.sha256})" if hypernet.sha256 else str(hypernet.source)
    report = new_report(rule.name, policy, subject, style, described)
    report.params = dict(params)
    report.actions = {name: layer.action for name, layer in plan.items()}
    report.sides = {name: layer.sides for name, layer in plan.items()}
    report.own_rule_names = frozenset(name for name, layer in plan.items() if layer.job is not None)
    report.own_rule_layers = len(report.own_rule_names)
    report.reasons = {name: layer.reason for name, layer in plan.items() if layer.reason}
    report.coefficient_means = [tuple(m.coefficients.mean(0).tolist()) for m in computed.values() if m.coefficients is not None]
    coefficients = {name: m.coefficients.to("cpu", torch.float32) for name, m in computed.items() if m.coefficients is not None}
    report.coefficient_blocks = summarize(coefficients)
    if not computed:
        raise LoraRarError(f"{subject.name} + {style.name}: no layer could be merged ({report.to_text()})")
    if rule.needs_hypernet and not report.hypernet_layers:  # a plain sum under the hypernet method's name
        raise LoraRarError(
            f"{subject.name} + {style.name}: {rule.name} merged no layer with the hypernet (no attention projection "
            f"of a width it serves is in both LoRAs; {', '.join(f'{n} {a}' for a, n in sorted(report.as_dict()['layers'].items()))}): "
            f"LoRAs for another model family? use method direct to sum them")
    if rule.needs_roles and not report.own_rule_layers:  # the method would only apply the layer policy under its name
        raise LoraRarError(
            f"{subject.name} + {style.name}: {rule.name} found no attention projection in both LoRAs "
            f"({', '.join(f'{n} {a}' for a, n in sorted(report.as_dict()['layers'].items()))}): its rule would "
            f"merge nothing; use direct or np-lora")
    layers = {name: computed[name].layer for name in plan if name in computed and computed[name].layer is not None}
    runtime = rule.finish({name: m.runtime for name, m in computed.items() if m.runtime is not None}, params)
    report.sampling = runtime.summary() if runtime is not None else {}
    report.sampling_line = runtime.summary_line() if runtime is not None else ""
    _check_finite(layers, subject, style)
    sources = {"subject": subject.sha256, "style": style.sha256}
    if rule.needs_hypernet and hypernet.sha256:
        sources["hypernet"] = hypernet.sha256
    return MergedLora(layers=layers, report=report, sources=sources, strengths=strengths,
                      source_paths=source_paths(subject, style, hypernet if rule.needs_hypernet else None),
                      coefficients=coefficients, runtime=runtime, unsavable=rule.unsavable)


def _check_same_shape(name: str, s_layer, t_layer, subject: LoraFile, style: LoraFile) -> None:
    """Both LoRAs' factors of one layer must describe the same update shape, kernel included."""
    if s_layer is None or t_layer is None:
        return
    if (s_layer.d_out, s_layer.d_in) != (t_layer.d_out, t_layer.d_in):
        raise LoraRarError(
            f"layer {name}: {subject.name} has shape ({s_layer.d_out}, {s_layer.d_in}) but {style.name} has "
            f"({t_layer.d_out}, {t_layer.d_in}): the LoRAs are for different base models")
    if s_layer.conv_kernel != t_layer.conv_kernel:
        raise LoraRarError(
            f"layer {name}: {subject.name} has a {s_layer.conv_kernel or 'linear'} kernel but {style.name} has "
            f"{t_layer.conv_kernel or 'linear'}: the same layer cannot be both; one of the files is malformed")


def _check_finite(layers: dict[str, LowRankLayer], subject: LoraFile, style: LoraFile) -> None:
    """Refuse a merge with a layer that is not finite, or whose update up @ down could overflow float32
    when ComfyUI forms it to patch the model: such a layer would turn the model's weights into NaN."""
    for name, layer in layers.items():
        bound = update_bound(layer)
        bias_ok = layer.bias is None or bool(torch.isfinite(layer.bias).all())
        if not (math.isfinite(bound) and bound <= _FLOAT32_MAX and bias_ok):
            raise LoraRarError(
                f"layer {name} of {subject.name} + {style.name}: the merged update is not finite or overflows float32 "
                f"(up to {bound:.3g}); the strengths or the files' values (alpha) are too large")
