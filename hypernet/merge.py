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

import json
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


@dataclass(frozen=True)
class Strengths:
    subject_model: float = 1.0
    style_model: float = 1.0
    subject_clip: float = 1.0
    style_clip: float = 1.0

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

    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
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


@torch.no_grad()
def lorarar_coefficients(hypernet: LoraRarHypernet, subject: LowRankLayer, style: LowRankLayer, device=None) -> torch.Tensor:
    """Column coefficients (d_in, 2) = H([dW_subject ; dW_style]) computed from the factors.

    Cost O(hidden * d_out * (r_s + r_t) + hidden * (r_s + r_t) * d_in): never d_out x d_in.
    """
    width = subject.d_out
    layer = hypernet.input_layer(width)
    if layer is None:
        raise LoraRarError(f"hypernet has no input layer for attention width {width}")
    device = device or layer.weight.device
    weight = layer.weight.to(device=device, dtype=torch.float32)

    def f32(tensor):
        return tensor.to(device=device, dtype=torch.float32)

    # the scale multiplies the small (hidden, rank) product, not the (rank, d_in) factor
    hidden = torch.addmm(f32(layer.bias)[:, None], (weight[:, :width] @ f32(subject.up)).mul_(subject.scale), f32(subject.down))
    hidden.addmm_((weight[:, width:] @ f32(style.up)).mul_(style.scale), f32(style.down))
    out = hypernet.output[1]
    return torch.addmm(out.bias.to(device, torch.float32), hidden.relu_().T, out.weight.to(device, torch.float32).T)


def _concat(parts: list[tuple[LowRankLayer, torch.Tensor | float]], device, dtype: torch.dtype) -> LowRankLayer:
    """Sum of updates weight_i * dW_i (weight a scalar or a per-column vector) as one low-rank layer.

    The weights are applied in float32 and the factors stored in ``dtype`` on the CPU.
    """
    ups, downs = [], []
    for layer, weight in parts:
        ups.append(layer.up)
        column_weight = weight * layer.scale if isinstance(weight, torch.Tensor) else float(weight) * layer.scale
        downs.append((layer.down.to(device=device, dtype=torch.float32) * column_weight).to("cpu", dtype))
    kernel = next((layer.kernel for layer, _ in parts if layer.kernel), ())
    up = torch.cat([u.to(dtype) for u in ups], dim=1)
    return LowRankLayer(up=up, down=torch.cat(downs, dim=0), scale=1.0, kernel=kernel)


def check_compatible(subject: LoraFile, style: LoraFile, base: UNetLayout | None) -> None:
    """Refuse pairs made for different base models, or for a base model other than the hypernet's."""
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
                    f"{lora.path}: cross-attention reads a {sorted(ctx)[0]}-wide text context, but the "
                    f"{base.name} hypernet expects {base.context_dim}: this LoRA is for another base model "
                    f"(SD1.5 uses 768)")


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
    if method not in METHODS:
        raise LoraRarError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if policy not in LAYER_POLICIES:
        raise LoraRarError(f"unknown layer policy {policy!r}; choose one of {', '.join(LAYER_POLICIES)}")
    if method == "lorarar" and hypernet is None:
        raise LoraRarError("method lorarar needs a hypernet")
    check_compatible(subject, style, base)
    device = torch.device(device) if device is not None else torch.device("cpu")
    hypernet_for_report = None
    if method == "lorarar":
        hypernet_for_report = f"{hypernet.source} (sha256 {hypernet.sha256})" if hypernet.sha256 else str(hypernet.source)
    report = MergeReport(method, policy, subject.name, style.name, hypernet_for_report)
    merged: dict[str, LowRankLayer] = {}
    if dtype is None:
        dtypes = {layer.up.dtype for lora in (subject, style) for layer in lora.layers.values() if isinstance(layer, LowRankLayer)}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    names = list(dict.fromkeys([*subject.layers, *style.layers]))
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names))
        s_layer, t_layer = subject.layers.get(name), style.layers.get(name)
        s_weight, t_weight = strengths.for_layer(name)
        present = [(which, layer) for which, layer in (("subject", s_layer), ("style", t_layer)) if layer is not None]
        other = [(which, layer) for which, layer in present if isinstance(layer, OtherLayer)]
        if other:
            report.actions[name] = "skipped"
            report.reasons[name] = f"{other[0][1].kind} adapter in the {other[0][0]} LoRA cannot be merged"
            continue
        if s_layer is not None and t_layer is not None and (s_layer.d_out, s_layer.d_in) != (t_layer.d_out, t_layer.d_in):
            raise LoraRarError(
                f"layer {name}: {subject.name} has shape ({s_layer.d_out}, {s_layer.d_in}) but {style.name} has "
                f"({t_layer.d_out}, {t_layer.d_in}): the LoRAs are for different base models")

        role = attention_role(name)
        if s_layer is not None and t_layer is not None and method == "lorarar" and role is not None:
            if role in ("to_k", "to_v"):
                merged[name] = _concat([(s_layer, s_weight), (t_layer, t_weight)], device, dtype)
                report.actions[name] = "summed"
                report.reasons[name] = "to_k/to_v (the published rule sums them)"
                continue
            if hypernet.input_layer(s_layer.d_out) is not None:
                coefficients = lorarar_coefficients(hypernet, s_layer, t_layer, device)
                report.coefficient_means.append(tuple(coefficients.mean(0).tolist()))
                merged[name] = _concat([(s_layer, coefficients[:, 0] * s_weight),
                                        (t_layer, coefficients[:, 1] * t_weight)], device, dtype)
                report.actions[name] = "hypernet"
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
            merged[name] = _concat(parts, device, dtype)
            report.actions[name] = "summed" if len(parts) == 2 else f"kept ({present[0][0]})"
        elif policy in ("subject", "style") and (policy == "subject" and s_layer or policy == "style" and t_layer):
            layer = s_layer if policy == "subject" else t_layer
            merged[name] = _concat([(layer, s_weight if policy == "subject" else t_weight)], device, dtype)
            report.actions[name] = f"kept ({policy})"
        else:
            report.actions[name] = "skipped"
            reason += f"; layer policy {policy}"
        report.reasons[name] = reason

    if progress is not None:
        progress(len(names), len(names))
    if not merged:
        raise LoraRarError(f"{subject.name} + {style.name}: no layer could be merged ({report.to_text()})")
    sources = {"subject": subject.sha256, "style": style.sha256}
    if method == "lorarar" and hypernet.sha256:
        sources["hypernet"] = hypernet.sha256
    return MergedLora(layers=merged, report=report, sources=sources, strengths=strengths)
