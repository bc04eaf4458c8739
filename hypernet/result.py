"""What a merge is asked for and what it gives: the strengths of the two LoRAs (``Strengths``), the merged LoRA
(``MergedLora``: its layers, runtime part, coefficients, sources) and its report (``MergeReport``).

Every way to a merged LoRA ends here: the merge pipeline (merge.py) and ZipLoRA's optimisation (ziplora.py) build
one, the nodes, the CLI and the save path read one. No merge method or pipeline is imported, so a module that only
holds or reads a merge does not load them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .coefficients import CoefficientGroup, summarize, summary_lines
from .errors import LoraRarError
from .keys import is_text_encoder
from .layers import SIDES, LoraFile, LowRankLayer
from .runtime import RuntimePart
from .tensors import to_kohya_state_dict

if TYPE_CHECKING:
    from .model import LoraRarHypernet

STRENGTH_LIMIT = 10.0  # |strength| at most this: the node's slider range and the CLI's, one place
_STRENGTH_NAMES = {"subject_model": "subject strength", "style_model": "style strength",
                   "subject_clip": "subject clip strength", "style_clip": "style clip strength"}


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
        if is_text_encoder(name):
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
    unmapped: dict[str, list[str]] = field(default_factory=dict)  # "subject"/"style" -> layers the model's key map lacks
    notes: list[str] = field(default_factory=list)  # what was changed on purpose, e.g. fp8 factors widened
    params: dict[str, float] = field(default_factory=dict)  # the method's own parameters (e.g. NP-LoRA's mu)
    sampling: dict = field(default_factory=dict)  # the runtime part's summary (K-LoRA: gamma, choices)
    sampling_line: str = ""  # and its line in the text
    coefficient_blocks: list[CoefficientGroup] = field(default_factory=list)  # per (UNet block, projection)
    # layers the method claimed: its own rule merged them (direct's rule is the sum, so all); the rest followed the
    # layer policy or were skipped
    own_rule_layers: int = 0
    # their names: a layer the node later leaves out (MergedLora.without) no longer counts as merged by the rule
    own_rule_names: frozenset = frozenset()
    # layer -> the LoRAs ("subject", "style") it came from; not shown (``actions`` says it in words)
    sides: dict[str, tuple[str, ...]] = field(default_factory=dict)

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
                  "reasons": {k: len(v) for k, v in sorted(reasons.items())},
                  "own_rule_layers": self.own_rule_layers}
        if self.params:
            result["params"] = dict(self.params)
        if self.sampling:
            result["sampling"] = dict(self.sampling)
        if self.notes:
            result["notes"] = list(self.notes)
        if self.ignored:
            result["ignored_tensors"] = {side: len(keys) for side, keys in self.ignored.items()}
        if self.unmapped:
            result["unmapped_layers"] = {side: len(stems) for side, stems in self.unmapped.items()}
        if self.coefficient_means:
            subject = [m for m, _ in self.coefficient_means]
            style = [m for _, m in self.coefficient_means]
            result["coefficients"] = {"subject_mean": sum(subject) / len(subject),
                                      "style_mean": sum(style) / len(style)}
        if self.coefficient_blocks:
            result["coefficient_blocks"] = [group.as_dict() for group in self.coefficient_blocks]
        return result

    def to_text(self) -> str:
        data = self.as_dict()
        params = "".join(f", {name}={value:g}" for name, value in self.params.items())
        lines = [f"LoRA.rar merge: method={self.method}{params}, layer policy={self.policy}",
                 f"subject: {self.subject}", f"style: {self.style}"]
        if self.hypernet:
            lines.append(f"hypernet: {self.hypernet}")
        lines.append("layers: " + ", ".join(f"{action} {n}" for action, n in sorted(data["layers"].items())))
        lines.append(f"{self.method}'s own rule: {self.own_rule_layers} of {len(self.actions)} layers")
        for reason, n in data["reasons"].items():
            lines.append(f"  {n} x {reason}")
        for side, keys in self.ignored.items():
            lines.append(f"ignored {len(keys)} tensors of the {side} LoRA that are no LoRA layer of this model type, e.g. {keys[0]}")
        for side, stems in self.unmapped.items():
            lines.append(f"not merged: {len(stems)} layers of the {side} LoRA that ComfyUI's key map does not know for "
                         f"this model (ComfyUI would not apply them either), e.g. {stems[0]}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.sampling_line:
            lines.append(self.sampling_line)
        if "coefficients" in data:
            c = data["coefficients"]
            lines.append(f"mean coefficients: subject {c['subject_mean']:.3f}, style {c['style_mean']:.3f}")
        if self.coefficient_blocks:
            lines.append("coefficients per block (column means; style-dominant: |style| > |subject|):")
            lines.extend(f"  {line}" for line in summary_lines(self.coefficient_blocks))
        return "\n".join(lines)


@dataclass
class MergedLora:
    layers: dict[str, LowRankLayer]
    report: MergeReport
    sources: dict[str, str]  # "subject"/"style"/"hypernet" -> sha256
    strengths: Strengths = Strengths()
    source_paths: dict[str, str] = field(default_factory=dict)  # "subject LoRA"/... -> the input file, never to be overwritten
    # what the method adds in the layers' forwards while the model runs (k-lora: the side chosen per sampling step);
    # ``layers`` holds the static rest
    runtime: RuntimePart | None = None
    # why no file holds the runtime part, after the method's name: its method's ``unsavable`` (the merge passes it in,
    # the CLI reads the same attribute before merging)
    unsavable: str = "has a part chosen while the model runs"

    def check_savable(self) -> None:
        """Refuse to write a merge with a runtime part as a file: no single LoRA holds it (the method says why)."""
        if self.runtime is not None:
            raise LoraRarError(
                f"{self.report.method} {self.unsavable}; it cannot be saved as one LoRA file; "
                "use the merge node's MODEL output, or save a merge made with another method")
    # layer -> (d_in, 2) float32 CPU subject/style column coefficients, for methods that predict them (lorarar)
    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)

    def files_of(self, name: str) -> list[str]:
        """The input LoRAs (report names) that layer ``name`` came from."""
        return [getattr(self.report, side) for side in self.report.sides.get(name, SIDES)]

    def named(self, subject: str, style: str, subject_path: str, style_path: str) -> "MergedLora":
        """This merge naming these files (same content, maybe renamed): itself when it already does, else a copy
        whose report, metadata and protected inputs name them."""
        paths = {**self.source_paths, "subject LoRA": str(subject_path), "style LoRA": str(style_path)}
        if (self.report.subject, self.report.style, self.source_paths) == (subject, style, paths):
            return self
        report = dataclasses.replace(self.report, subject=subject, style=style)
        return dataclasses.replace(self, report=report, source_paths=paths)

    def without(self, dropped: dict[str, str]) -> "MergedLora":
        """A copy without the layers in ``dropped`` (layer -> why), which the report lists as skipped."""
        report = dataclasses.replace(self.report, actions=dict(self.report.actions), reasons=dict(self.report.reasons))
        for name, why in dropped.items():
            report.actions[name], report.reasons[name] = "skipped", why
        report.own_rule_names = report.own_rule_names - dropped.keys()
        report.own_rule_layers = len(report.own_rule_names)
        layers = {name: layer for name, layer in self.layers.items() if name not in dropped}
        coefficients = {name: c for name, c in self.coefficients.items() if name not in dropped}
        report.coefficient_blocks = summarize(coefficients)
        return dataclasses.replace(self, layers=layers, report=report, coefficients=coefficients)

    def kohya_state_dict(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        self.check_savable()
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


def new_report(method: str, policy: str, subject: LoraFile, style: LoraFile, hypernet: str | None) -> MergeReport:
    sides = (("subject", subject), ("style", style))
    return MergeReport(method, policy, subject.name, style.name, hypernet,
                       ignored={side: lora.ignored_keys for side, lora in sides if lora.ignored_keys},
                       unmapped={side: lora.unmapped for side, lora in sides if lora.unmapped},
                       notes=[f"{side} LoRA: {note}" for side, lora in sides for note in lora.notes])


def source_paths(subject: LoraFile, style: LoraFile, hypernet: LoraRarHypernet | None) -> dict[str, str]:
    paths = {"subject LoRA": subject.path, "style LoRA": style.path}
    if hypernet is not None and hypernet.source:
        paths["hypernet"] = str(hypernet.source)
    return paths
