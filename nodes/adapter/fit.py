"""Whether a merged LoRA fits the loaded model: the one fit / shape / overflow verdict, and its runtime part injected.

A merge's static layers are patched through ComfyUI's own LoRA patching (comfy.sd.load_lora_for_models with a
kohya state dict, model.py's ``apply_merged``, which asks :func:`verdict` first and keeps the last verdict); its
runtime part, if any, rides on the one injector (branch.py). Before anything is patched, every layer is checked
against the weight ComfyUI's key map sends it to (a :class:`~model.ModelView`): in the model at all, same shape, no
two names for one weight, and no Inf/NaN once added in the model's own dtype (each runtime update alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import comfy.model_management
import torch

from ...hypernet.errors import LoraRarError
from ...hypernet.keys import is_text_encoder
from ...hypernet.layers import LowRankLayer
from ...hypernet.lowrank import patched_overflow
from ...hypernet.names import target_key
from ...hypernet.tensors import to_kohya_state_dict
from .branch import inject

if TYPE_CHECKING:  # the view is built by model.py, which applies the verdict; the merge is hypernet's result type
    from ...hypernet.result import MergedLora
    from .model import ModelView


def target_weight(target, weights: dict):
    """The part of a model weight a key-map entry patches: a key, or (key, (dim, start, length), ...)."""
    weight = weights[target_key(target)]
    return weight if isinstance(target, str) else weight.narrow(*target[1])


def target_shape(target, weights) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(weight shape, bias shape or None) a key-map entry patches."""
    key = target_key(target)
    bias = weights.get(key[:-len(".weight")] + ".bias") if key.endswith(".weight") else None
    return tuple(target_weight(target, weights).shape), (tuple(bias.shape) if bias is not None else None)


def in_model(name: str, key_map: dict, weights: dict) -> bool:
    """Whether ComfyUI's patcher will find a weight for layer ``name`` (it silently drops the others)."""
    target = key_map.get(name)
    return target is not None and target_key(target) in weights


def layer_misfit(name: str, layer: LowRankLayer, key_map: dict, weights: dict) -> str | None:
    """Why ``layer`` would not apply as meant to the weight ``name`` patches (ComfyUI skips a wrong shape, or
    reshapes it scrambled); None when it fits. The one shape check of merging, ZipLoRA and training."""
    return layer.misfit(*target_shape(key_map[name], weights))


def _patch_dtype(model, weight) -> torch.dtype:
    """The narrowest float type the patch of ``weight`` passes through: the weight's own, or float16 where
    ComfyUI (0.33+) computes LoRA arithmetic in float16 on this device."""
    compute = getattr(comfy.model_management, "lora_compute_dtype", None)
    narrow = [weight.dtype, compute(model.load_device) if compute else weight.dtype]
    return next((d for d in (torch.float16, torch.bfloat16) if d in narrow), torch.float32)


def _refuse_overflow(model, update: LowRankLayer, weight, what: str) -> None:
    dtype = _patch_dtype(model, weight)
    largest = patched_overflow(update, weight, dtype)
    if largest is not None:
        raise LoraRarError(f"{what}: added to this model's {dtype} weights it would reach {largest:.3g} (the most "
                           f"{dtype} holds is {torch.finfo(dtype).max:.3g}): lower the strengths")


def _overflows(model, applied: MergedLora, view: ModelView, names: list[str]) -> None:
    """Refuse a merge whose patch would put Inf or NaN into the model's weights (e.g. float16 ones)."""
    for name in names:
        _refuse_overflow(model, applied.layers[name], target_weight(view.key_map[name], view.weights),
                         f"layer {name} of {' + '.join(applied.files_of(name))}")


def _runtime_overflows(model, merged: MergedLora, view: ModelView) -> None:
    """A runtime branch adds its updates in the layer's forward, in the model's compute dtype: refuse one that
    would overflow there, as a static patch of the same update would (each update alone)."""
    runtime = merged.runtime
    for name in (runtime.layer_names() if runtime is not None else ()):
        updates = runtime.updates(name)
        if not in_model(name, view.key_map, view.weights) or layer_misfit(name, updates[0][1], view.key_map, view.weights):
            continue  # not injected in this model: the injector reports it
        for side, update in updates:
            files = {"subject": merged.report.subject, "style": merged.report.style}
            _refuse_overflow(model, update, target_weight(view.key_map[name], view.weights),
                             f"layer {name} of {files.get(side, ' + '.join(files.values()))} ({merged.report.method}, "
                             f"{side} side)")


def _runtime_convs(merged: MergedLora) -> None:
    """A runtime branch adds h(x) = B A x to a linear's or a 1x1 conv's output (branch.py); a kxk conv's update is a
    convolution no branch adds. Left out, such a layer would get neither the method's update nor the layer
    policy's, so a runtime part claiming one is refused, naming the method, the layer and the fix."""
    runtime = merged.runtime
    kernels = {name: runtime.updates(name)[0][1].conv_kernel for name in runtime.layer_names()} if runtime else {}
    convs = [(name, kernel) for name, kernel in kernels.items() if kernel]
    if convs:
        (name, kernel), more = convs[0], f" and {len(convs) - 1} more" if len(convs) > 1 else ""
        raise LoraRarError(f"{merged.report.method}: its runtime part adds to layer {name}{more}, a "
                           f"{'x'.join(map(str, kernel))} convolution; a runtime branch adds to linears and 1x1 convs "
                           "only: the method must decline such layers in claim() (their conv_kernel), which leaves "
                           "them to the layer policy")


def _shared_targets(names: list[str], key_map: dict) -> None:
    """Two layer names for one model weight: ComfyUI would apply only one of them, silently."""
    seen: dict[str, str] = {}
    for name in names:
        key = target_key(key_map[name])
        if key in seen:
            raise LoraRarError(f"layers {seen[key]} and {name} both patch {key} (the same layer named two ways, "
                               "e.g. lora_te_ and lora_te1_); ComfyUI would apply only one: rename one of them")
        seen[key] = name


def _misfits(merged: MergedLora, view: ModelView) -> dict[str, str]:
    """Layer -> why its patch would not apply as meant."""
    misfits = {}
    for name, layer in merged.layers.items():
        if not in_model(name, view.key_map, view.weights):
            continue  # not in this model: reported separately
        why = layer_misfit(name, layer, view.key_map, view.weights)
        if why:
            misfits[name] = f"{why} (from {' + '.join(merged.files_of(name))})"
    return misfits


def _verdict_text(patched: list[str], misfits: dict[str, str], unknown: list[str], clip) -> str:
    text = f"applied to the model: {len(patched)} layers"
    if misfits:
        text += (f"; not applied: {len(misfits)} layers whose shape does not fit this model: "
                 + "; ".join(f"{name}: {why}" for name, why in list(misfits.items())[:5])
                 + (f"; and {len(misfits) - 5} more" if len(misfits) > 5 else ""))
    if unknown:
        text_layers = sum(1 for n in unknown if is_text_encoder(n))
        text += (f"; not applied: {len(unknown)} layers not in this model"
                 + (f" ({text_layers} text-encoder layers: connect a CLIP)" if text_layers and clip is None else "")
                 + f", e.g. {unknown[0]}")
    return text


def verdict(view: ModelView, merged: MergedLora):
    """(applied, patched names, kohya state dict, text): which merged layers the viewed model can take, and the
    state dict that patches them; refuses merges that fit nowhere, name one weight twice, or would overflow."""
    model, clip = view.model, view.clip
    misfits = _misfits(merged, view)
    applied = merged.without(misfits) if misfits else merged
    unknown = [name for name in applied.layers if not in_model(name, view.key_map, view.weights)]
    patched = [name for name in applied.layers if name not in unknown]
    runtime = merged.runtime.layer_names() if merged.runtime is not None else []
    if not patched and not any(in_model(name, view.key_map, view.weights) for name in runtime):
        example = next(iter(misfits.items()), None)
        raise LoraRarError(f"{merged.report.subject} + {merged.report.style}: none of the merged layers fits this "
                           f"{view.family} model" + (f" (e.g. {example[0]}: {example[1]})" if example else "")
                           + "; are the LoRAs for another base model?")
    _shared_targets(patched, view.key_map)
    _overflows(model, applied, view, patched)
    _runtime_convs(merged)
    _runtime_overflows(model, merged, view)
    # each layer as merged (float32 where float16 would overflow); the layers not in this model are left out
    state_dict = to_kohya_state_dict({name: applied.layers[name] for name in patched}, dtype=None)
    return applied, patched, state_dict, _verdict_text(patched, misfits, unknown, clip)


def apply_runtime(model, merged: MergedLora, view: ModelView) -> tuple[object, list[str], str]:
    """(clone running a fresh branch of the merge's runtime part, layers injected, a line for the report)."""
    branch = merged.runtime.branch()
    model_out, injected, skipped = inject(model, branch, view.module_paths())
    verb = "switched per sampling step" if branch.follows_sampling else "added at run time"
    text = f"{verb}: {len(injected)} layers"
    if skipped:
        name, why = next(iter(skipped.items()))
        text += f"; not {verb.split()[0]}: {len(skipped)} layers that do not fit this model, e.g. {name}: {why}"
    return model_out, injected, text
