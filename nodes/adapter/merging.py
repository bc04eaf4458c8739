"""The merge as the nodes run it: two LoRA files read through the model's key map, merged by a registered
method (hypernet/merge.py), cached by content, and applied to MODEL / CLIP with its report."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.utils

from ...hypernet import methods
from ...hypernet.cache import BoundedCache
from ...hypernet.checkpoints import load_manifest
from ...hypernet.errors import unforeseen_as_error
from ...hypernet.files import file_sha256
from ...hypernet.merge import MergedLora, Strengths, merge_loras
from .fit import apply_merged
from .model import lora_path
from .model import ModelView, model_class, model_signature
from .roles import attention_roles, unknown_attention_classes

# The last merge, keyed by the inputs' content: re-running a graph where only the prompt or the sampler changed
# reuses it. One entry, so ComfyUI's own cache settings still bound what stays in memory.
MERGES: BoundedCache[MergedLora] = BoundedCache(
    1, "files' sha256, hypernet sha256, method and parameters, layer policy, strengths, model signature, roles")


@dataclass(frozen=True)
class MergeRequest:
    """What the merge node (or a Compare column) asks for; LoRAs by their names in models/loras."""

    subject_lora: str
    style_lora: str
    method: str
    layer_policy: str
    strengths: Strengths
    params: dict


def _base_model_note(name: str | None, model) -> str:
    """A line for the report when the hypernet was trained on another member of the SDXL family."""
    info = load_manifest().get(name) if name else None
    if info is None or model_class(model) in info.comfy_model_classes[:1]:
        return ""
    return (f"note: the {info.name} hypernet was trained on {info.comfy_model_classes[0]} LoRAs; this model is "
            f"{model_class(model)} (same attention widths)")


def _unknown_attention_note(method: str, model) -> str:
    """A line for the report when a method that treats attention apart meets attention classes the pack's table
    lacks: their linears get no role, so they follow the layer policy (a new ComfyUI family, a custom model)."""
    unknown = unknown_attention_classes(model.model.diffusion_model) if methods.get(method).needs_roles else []
    return (f"note: {len(unknown)} attention classes of this model are not in the pack's table ({', '.join(unknown[:3])}): "
            "their linears follow the layer policy" if unknown else "")


def _merge_files(request: MergeRequest, paths: tuple[str, str], net, model, clip, roles: dict) -> MergedLora:
    view = ModelView(model, clip)
    subject, style = view.read_pair(*paths)
    bar = comfy.utils.ProgressBar(1)
    with unforeseen_as_error(" + ".join(paths)):
        # checked against the model itself: a LoRA for another base model is refused whatever the method
        return merge_loras(subject, style, net, request.method, request.layer_policy, request.strengths,
                           layout=view.layout, device=comfy.model_management.get_torch_device(), params=request.params,
                           progress=lambda done, total: bar.update_absolute(done, total), family=view.family,
                           roles=roles)


def merge_for_model(model, clip, hypernet, request: MergeRequest) -> tuple:
    """(MODEL, CLIP, merged LoRA as applied, report text) of ``request`` on this model."""
    paths = (lora_path(request.subject_lora), lora_path(request.style_lora))
    net, name = None, None
    if methods.get(request.method).needs_hypernet:
        net, _, name = hypernet.for_model(model)
    # the roles decide what k-lora / lorarar do per layer, and two models of one class and unet_config can
    # differ in them (a node pack's own attention modules): they are part of the key (a few ms on a 12B model)
    with unforeseen_as_error(f"{model_class(model)} model's attention modules"):
        roles = attention_roles(getattr(model.model, "diffusion_model", None))
    key = (*map(file_sha256, paths), net.sha256 if net else None, request.method,
           tuple(sorted(request.params.items())), request.layer_policy, request.strengths,
           model_signature(model, clip), tuple(sorted(roles.items())))
    merged, _ = MERGES.get_or_make(key, lambda: _merge_files(request, paths, net, model, clip, roles))
    # the names (and paths) given now, also when the merge itself was reused for files of the same content
    merged = merged.named(request.subject_lora, request.style_lora, *paths)
    model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
    notes = [_base_model_note(name, model), _unknown_attention_note(request.method, model)]
    trained = f"hypernet {net.describe(name)}" if net is not None and net.training_metadata else ""
    return (model_out, clip_out, applied,
            "\n".join(filter(None, [applied.report.to_text(), applied_text, *notes, trained])))
