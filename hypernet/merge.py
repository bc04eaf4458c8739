"""Merging a subject LoRA and a style LoRA, kept low-rank.

LoRA.rar rule (arXiv 2412.05148), per UNet attention projection present in both LoRAs:
- to_q, to_out.0: H reads [dW_subject[:, j] ; dW_style[:, j]] for every input column j and returns
  (m_subject[j], m_style[j]); merged dW = dW_subject * m_subject + dW_style * m_style (column scaling).
- to_k, to_v: merged dW = dW_subject + dW_style.
H's first layer is linear, so its hidden layer is computed from the factors,
W_in @ [dW_s; dW_t] = (W_subject @ up_s) @ down_s + (W_style @ up_t) @ down_t, and the merged update is a
LoRA of rank r_subject + r_style: up = [up_s | up_t], down = [down_s * m_s ; down_t * m_t].
No dense d_out x d_in update is ever formed.

Strengths scale each LoRA's contribution after H: with strengths (a, b) the merged update is
a * m_s * dW_s + b * m_t * dW_t; strengths 1 and 1 give the published rule exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .base_models import UNetLayout
from .errors import LoraRarError
from .keys import attention_role
from .lora_io import LoraFile, LowRankLayer, OtherLayer, to_kohya_state_dict
from .model import LoraRarHypernet

METHODS = ("lorarar", "direct")
LAYER_POLICIES = ("sum", "subject", "style", "skip")
LAYER_POLICY_HELP = (
    "Layers LoRA.rar does not cover (non-attention layers, text encoders, layers in only one LoRA, "
    "widths the hypernet has no input for): sum = strength-weighted sum kept low-rank (default); "
    "subject / style = keep only that LoRA's layer; skip = leave the layer out. "
    "DoRA/LoHa/LoKr layers are never merged and are listed in the report."
)

STRENGTH_LIMIT = 10.0  # |strength| at most this: the node's slider range and the CLI's, one place
_STRENGTH_NAMES = {"subject_model": "subject strength", "style_model": "style strength",
                   "subject_clip": "subject clip strength", "style_clip": "style clip strength"}
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Strengths:
    subject_model: float = 1.0
    style_model: float = 1.0
    subject_clip: float = 1.0
    style_clip: float = 1.0

    def __post_init__(self):
        # ComfyUI's min/max validation lets NaN through (every comparison with NaN is false)
        for name, label in _STRENGTH_NAMES.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= STRENGTH_LIMIT):
                raise LoraRarError(f"{label} {value!r}: strengths must be finite numbers between "
                                   f"-{STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g}")

    def for_layer(self, name: str) -> tuple[float, float]:
        if name.startswith("lora_te"):
            return self.subject_clip, self.style_clip
        return self.subject_model, self.style_model


@dataclass
class MergeReport:
    method: str
    policy: str
    subject: str
    style: str
    hypernet: str | None
    actions: dict[str, str] = field(default_factory=dict)  # layer -> action
    reasons: dict[str, str] = field(default_factory=dict)  # layer -> why it was summed / kept / skipped
    coefficient_means: list[tuple[float, float]] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # "subject"/"style" -> tensor keys that are no LoRA tensor
    notes: list[str] = field(default_factory=list)  # what was changed on purpose, e.g. fp8 factors widened

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions.values() if a == action)

    @property
    def hypernet_layers(self) -> int:
        return self.count("hypernet")

    def as_dict(self) -> dict:
        summary = {}
        for layer, action in self.actions.items():
            summary[action] = summary.get(action, 0) + 1
        reasons = {}
        for layer, reason in self.reasons.items():
            reasons.setdefault(f"{self.actions[layer]}: {reason}", []).append(layer)
        result = {"method": self.method, "layer_policy": self.policy, "subject": self.subject,
                  "style": self.style, "hypernet": self.hypernet, "layers": summary,
                  "reasons": {k: len(v) for k, v in sorted(reasons.items())}}
        if self.notes:
            result["notes"] = list(self.notes)
        if self.ignored:
            result["ignored_tensors"] = {side: len(keys) for side, keys in self.ignored.items()}
        if self.coefficient_means:
            subject = [m for m, _ in self.coefficient_means]
            style = [m for _, m in self.coefficient_means]
            result["coefficients"] = {"subject_mean": sum(subject) / len(subject),
                                      "style_mean": sum(style) / len(style)}
        return result

    def to_text(self) -> str:
        data = self.as_dict()
        lines = [f"LoRA.rar merge: method={self.method}, layer policy={self.policy}",
                 f"subject: {self.subject}", f"style: {self.style}"]
        if self.hypernet:
            lines.append(f"hypernet: {self.hypernet}")
        lines.append("layers: " + ", ".join(f"{action} {n}" for action, n in sorted(data["layers"].items())))
        for reason, n in data["reasons"].items():
            lines.append(f"  {n} x {reason}")
        for side, keys in self.ignored.items():
            lines.append(f"ignored {len(keys)} tensors of the {side} LoRA that are no LoRA layer of this model type, e.g. {keys[0]}")
        lines.extend(f"note: {note}" for note in self.notes)
        if "coefficients" in data:
            c = data["coefficients"]
            lines.append(f"mean coefficients: subject {c['subject_mean']:.3f}, style {c['style_mean']:.3f}")
        return "\n".join(lines)


@dataclass
class MergedLora:
    layers: dict[str, LowRankLayer]
    report: MergeReport
    sources: dict[str, str]  # "subject"/"style"/"hypernet" -> sha256
    strengths: Strengths = Strengths()
    source_paths: dict[str, str] = field(default_factory=dict)  # "subject LoRA"/... -> the input file, never to be overwritten

    def files_of(self, name: str) -> list[str]:
        """The input LoRAs (report names) that layer ``name`` came from."""
        action = self.report.actions.get(name, "")
        if action.startswith("kept ("):
            return [self.report.subject if "subject" in action else self.report.style]
        return [self.report.subject, self.report.style]

    def without(self, dropped: dict[str, str]) -> "MergedLora":
        """A copy without the layers in ``dropped`` (layer -> why), which the report lists as skipped."""
        report = dataclasses.replace(self.report, actions=dict(self.report.actions), reasons=dict(self.report.reasons))
        for name, why in dropped.items():
            report.actions[name], report.reasons[name] = "skipped", why
        layers = {name: layer for name, layer in self.layers.items() if name not in dropped}
        return dataclasses.replace(self, layers=layers, report=report)

    def kohya_state_dict(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        return to_kohya_state_dict(self.layers, dtype)

    def metadata(self, pack_version: str) -> dict[str, str]:
        """safetensors metadata: where the merge came from, enough to reproduce it."""
        return {
            "lorarar_method": self.report.method,
            "lorarar_layer_policy": self.report.policy,
            "lorarar_subject": self.report.subject,
            "lorarar_subject_sha256": self.sources["subject"],
            "lorarar_style": self.report.style,
            "lorarar_style_sha256": self.sources["style"],
            "lorarar_hypernet_sha256": self.sources.get("hypernet", ""),
            "lorarar_strengths": json.dumps(vars(self.strengths)),
            "lorarar_report": json.dumps(self.report.as_dict()),
            "lorarar_pack_version": pack_version,
            "ss_network_module": "networks.lora",
        }


class _FactoredHypernet:
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
    factored = _FactoredHypernet(hypernet, torch.device(device) if device is not None else layer.weight.device)
    return factored.coefficients(factored.subject_hidden(subject), style)


@torch.no_grad()
def lorarar_coefficients_batched(hypernet: LoraRarHypernet, pairs: list[tuple[LowRankLayer, LowRankLayer]],
                                 device=None) -> list[torch.Tensor]:
    """lorarar_coefficients for many layer pairs, layers of the same shapes stacked through H in one call.

    Stacking copies the factors and holds a (layers, hidden, d_in) hidden layer: on a 2-core CPU it is
    slower than the per-layer loop (bench/merge_bench.py measures both), so merge_loras uses it only on
    accelerators, where one kernel launch per layer is what costs.
    """
    if not pairs:
        return []
    device = torch.device(device) if device is not None else torch.device("cpu")
    factored = _FactoredHypernet(hypernet, device)
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


def _concat(parts: list[tuple], device, dtype: torch.dtype) -> LowRankLayer:
    """Sum of updates weight_i * dW_i (weight a scalar or a per-column vector) as one low-rank layer.

    parts: (layer, weight) or (layer, weight, strength); bias differences are summed with the scalar
    strength (the weight itself when it is a scalar). The weights are applied in float32 and the factors
    stored in ``dtype`` on the CPU, each output factor written once; a float16 factor that would overflow
    (the coefficients are unbounded) is kept in float32 instead.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    down = torch.empty(sum(part[0].rank for part in parts), parts[0][0].d_in, dtype=dtype, device=device)
    row = 0
    for layer, weight, *_ in parts:
        if isinstance(weight, torch.Tensor):
            column_weight = weight.to(device, torch.float32) * layer.scale
        else:
            # one element but not 0-dim, so type promotion computes in float32 for bf16/fp16 factors too
            column_weight = torch.full((1,), float(weight) * layer.scale, dtype=torch.float32, device=device)
        # float32 product (the weight is float32), rounded once into the output dtype
        torch.mul(layer.down.to(device), column_weight, out=down[row:row + layer.rank])
        row += layer.rank
    if dtype == torch.float16 and not torch.isfinite(down).all():
        return _concat(parts, device, torch.float32)
    up = torch.cat([part[0].up.to(dtype) for part in parts], dim=1)
    biases = [(part[0].bias, part[2] if len(part) > 2 else part[1]) for part in parts if part[0].bias is not None]
    bias = sum(b.to(torch.float32) * float(w) for b, w in biases).to(dtype) if biases else None
    kernel = next((part[0].kernel for part in parts if part[0].kernel), ())
    return LowRankLayer(up=up, down=down.to("cpu"), scale=1.0, kernel=kernel, bias=bias)


def check_compatible(subject: LoraFile, style: LoraFile, base: UNetLayout | None) -> None:
    """Refuse pairs made for different base models, or for another base model than ``base`` (the model's layout)."""
    subject_ctx, style_ctx = subject.context_dims(), style.context_dims()
    if subject_ctx and style_ctx and subject_ctx != style_ctx:
        raise LoraRarError(
            f"{subject.name} (text context {sorted(subject_ctx)}) and {style.name} (text context "
            f"{sorted(style_ctx)}) are LoRAs for different base models")
    if base is not None:
        for lora in (subject, style):
            ctx = lora.context_dims()
            if ctx and ctx != {base.context_dim}:
                raise LoraRarError(
                    f"{lora.path}: cross-attention reads a {sorted(ctx)[0]}-wide text context, but {base.name} "
                    f"uses {base.context_dim}: this LoRA is for another base model (SD1.5 uses 768)")


def merge_loras(
    subject: LoraFile,
    style: LoraFile,
    hypernet: LoraRarHypernet | None,
    method: str = "lorarar",
    policy: str = "sum",
    strengths: Strengths = Strengths(),
    base: UNetLayout | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergedLora:
    """Merge two LoRAs layer by layer; the result's layers are low-rank (rank r_subject + r_style at most).

    device: where the hypernet runs (the model's device); dtype: of the merged factors (default: the
    inputs' common type, float32 when they differ); progress(done, total) is called per layer.
    """
    return merge_many(subject, [style], hypernet, method, policy, strengths, base, device, dtype, progress)[0]


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
    base: UNetLayout | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[MergedLora]:
    """One subject merged with each of several styles: ``merge_loras(subject, style)`` for every style.

    Layer by layer, the subject's share of H's hidden layer (bias + W_subject @ dW_subject) is computed
    once and reused for every style, so n styles cost about (n + 1) / 2n of n separate merges' H work.
    progress(done, total) counts layers of the union of all inputs.
    """
    if method not in METHODS:
        raise LoraRarError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if policy not in LAYER_POLICIES:
        raise LoraRarError(f"unknown layer policy {policy!r}; choose one of {', '.join(LAYER_POLICIES)}")
    if method == "lorarar" and hypernet is None:
        raise LoraRarError("method lorarar needs a hypernet")
    if not styles:
        raise LoraRarError("merge_many needs at least one style LoRA")
    for style in styles:
        check_compatible(subject, style, base)
    device = torch.device(device) if device is not None else torch.device("cpu")
    hypernet_for_report = None
    if method == "lorarar":
        hypernet_for_report = f"{hypernet.source} (sha256 {hypernet.sha256})" if hypernet.sha256 else str(hypernet.source)
    factored = _FactoredHypernet(hypernet, device) if method == "lorarar" else None
    reports = [_new_report(method, policy, subject, style, hypernet_for_report) for style in styles]
    merged: list[dict[str, LowRankLayer]] = [{} for _ in styles]
    dtypes = [dtype or _merged_dtype(subject, style) for style in styles]
    # accelerators: same-shape layers go through H together (per-layer kernel launches are what costs there)
    batched = factored is not None and device.type != "cpu"

    names = list(dict.fromkeys([*subject.layers, *(name for style in styles for name in style.layers)]))
    deferred: list[tuple[int, str, LowRankLayer, LowRankLayer, float, float]] = []
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names))
        s_layer = subject.layers.get(name)
        s_weight, t_weight = strengths.for_layer(name)
        subject_hidden = None
        for k, style in enumerate(styles):
            t_layer = style.layers.get(name)
            if s_layer is None and t_layer is None:
                continue
            report = reports[k]
            present = [(which, layer) for which, layer in (("subject", s_layer), ("style", t_layer)) if layer is not None]
            other = [(which, layer) for which, layer in present if isinstance(layer, OtherLayer)]
            if other:
                report.reasons[name] = "; ".join(f"{layer.kind} adapter in the {which} LoRA cannot be merged" for which, layer in other)
                plain = [(which, layer) for which, layer in present if not isinstance(layer, OtherLayer)]
                report.actions[name] = "skipped"
                if plain and (method == "direct" or policy in ("sum", plain[0][0])):
                    # the plain LoRA side of a mixed layer is kept as the policy says; the other adapter is reported
                    which, layer = plain[0]
                    merged[k][name] = _concat([(layer, s_weight if which == "subject" else t_weight)], device, dtypes[k])
                    report.actions[name] = f"kept ({which})"
                continue
            _check_same_shape(name, s_layer, t_layer, subject, style)

            role = attention_role(name)
            if s_layer is not None and t_layer is not None and method == "lorarar" and role is not None:
                if role in ("to_k", "to_v"):
                    merged[k][name] = _concat([(s_layer, s_weight), (t_layer, t_weight)], device, dtypes[k])
                    report.actions[name] = "summed"
                    report.reasons[name] = "to_k/to_v (the published rule sums them)"
                    continue
                if hypernet.input_layer(s_layer.d_out) is not None:
                    report.actions[name] = "hypernet"
                    if batched:
                        deferred.append((k, name, s_layer, t_layer, s_weight, t_weight))
                        merged[k][name] = None  # keeps the layer order; filled after the batched pass
                        continue
                    if subject_hidden is None:
                        subject_hidden = factored.subject_hidden(s_layer)
                    coefficients = factored.coefficients(subject_hidden, t_layer)
                    _store_hypernet_layer(merged[k], report, name, s_layer, t_layer, coefficients, s_weight, t_weight, device, dtypes[k])
                    continue
                reason = f"width {s_layer.d_out}: the hypernet has no input layer for it"
            elif method == "direct":
                reason = "direct method"
            elif s_layer is None or t_layer is None:
                reason = f"only in the {present[0][0]} LoRA"
            elif name.startswith("lora_te"):
                reason = "text encoder layer"
            else:
                reason = "not an attention projection"

            if method == "direct" or policy == "sum":
                parts = [(layer, s_weight if which == "subject" else t_weight) for which, layer in present]
                merged[k][name] = _concat(parts, device, dtypes[k])
                report.actions[name] = "summed" if len(parts) == 2 else f"kept ({present[0][0]})"
            elif policy in ("subject", "style") and (policy == "subject" and s_layer or policy == "style" and t_layer):
                layer = s_layer if policy == "subject" else t_layer
                merged[k][name] = _concat([(layer, s_weight if policy == "subject" else t_weight)], device, dtypes[k])
                report.actions[name] = f"kept ({policy})"
            else:
                report.actions[name] = "skipped"
                reason += f"; layer policy {policy}"
            report.reasons[name] = reason

    if deferred:
        all_coefficients = lorarar_coefficients_batched(hypernet, [(s, t) for _, _, s, t, _, _ in deferred], device)
        for (k, name, s_layer, t_layer, s_weight, t_weight), coefficients in zip(deferred, all_coefficients):
            _store_hypernet_layer(merged[k], reports[k], name, s_layer, t_layer, coefficients, s_weight, t_weight, device, dtypes[k])

    if progress is not None:
        progress(len(names), len(names))
    results = []
    for k, style in enumerate(styles):
        if not merged[k]:
            raise LoraRarError(f"{subject.name} + {style.name}: no layer could be merged ({reports[k].to_text()})")
        # each result lists its layers in the order of merge_loras(subject, style): subject's, then the style's
        order = list(dict.fromkeys([*subject.layers, *style.layers]))
        layers = {name: merged[k][name] for name in order if name in merged[k]}
        _check_finite(layers, subject, style)
        reports[k].actions = {name: reports[k].actions[name] for name in order if name in reports[k].actions}
        sources = {"subject": subject.sha256, "style": style.sha256}
        if method == "lorarar" and hypernet.sha256:
            sources["hypernet"] = hypernet.sha256
        results.append(MergedLora(layers=layers, report=reports[k], sources=sources, strengths=strengths,
                                  source_paths=_source_paths(subject, style, hypernet if method == "lorarar" else None)))
    return results


def _store_hypernet_layer(merged, report, name, s_layer, t_layer, coefficients, s_weight, t_weight, device, dtype) -> None:
    """The merged layer [up_s | up_t], [down_s * m_s * a ; down_t * m_t * b] from a layer's (d_in, 2) coefficients."""
    report.coefficient_means.append(tuple(coefficients.mean(0).tolist()))
    merged[name] = _concat([(s_layer, coefficients[:, 0] * s_weight, s_weight),
                            (t_layer, coefficients[:, 1] * t_weight, t_weight)], device, dtype)


def _new_report(method: str, policy: str, subject: LoraFile, style: LoraFile, hypernet: str | None) -> MergeReport:
    sides = (("subject", subject), ("style", style))
    return MergeReport(method, policy, subject.name, style.name, hypernet,
                       ignored={side: lora.ignored_keys for side, lora in sides if lora.ignored_keys},
                       notes=[f"{side} LoRA: {note}" for side, lora in sides for note in lora.notes])


def _source_paths(subject: LoraFile, style: LoraFile, hypernet: LoraRarHypernet | None) -> dict[str, str]:
    paths = {"subject LoRA": subject.path, "style LoRA": style.path}
    if hypernet is not None and hypernet.source:
        paths["hypernet"] = str(hypernet.source)
    return paths


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


def _update_bound(layer: LowRankLayer) -> float:
    """An upper bound on |scale * up @ down| from two passes over the factors (NaN when a factor holds NaN).

    |dW_ij| <= rank * max|up| * max|down| * |scale|; computed in Python floats (float64), so it does not
    itself overflow where float32 would.
    """
    def largest(tensor: torch.Tensor) -> float:
        low, high = torch.aminmax(tensor)  # one pass, no temporary; NaN propagates
        return max(-float(low), float(high))
    return layer.rank * largest(layer.up) * largest(layer.down) * abs(layer.scale)


def _check_finite(layers: dict[str, LowRankLayer], subject: LoraFile, style: LoraFile) -> None:
    """Refuse a merge with a layer that is not finite, or whose update up @ down could overflow float32
    when ComfyUI forms it to patch the model: such a layer would turn the model's weights into NaN."""
    for name, layer in layers.items():
        bound = _update_bound(layer)
        bias_ok = layer.bias is None or bool(torch.isfinite(layer.bias).all())
        if not (math.isfinite(bound) and bound <= _FLOAT32_MAX and bias_ok):
            raise LoraRarError(
                f"layer {name} of {subject.name} + {style.name}: the merged update is not finite or overflows float32 "
                f"(up to {bound:.3g}); the strengths or the files' values (alpha) are too large")
