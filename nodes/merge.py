"""Merge node: two LoRA files + the hypernet -> one merged low-rank LoRA patched onto MODEL and CLIP."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..hypernet import methods
from ..hypernet.checkpoints import load_manifest
from ..hypernet.errors import LoraRarError, unforeseen_as_error
from ..hypernet.keys import is_text_encoder
from ..hypernet.files import read_state_dict
from ..hypernet.lora_io import LoraFile, to_kohya_state_dict
from ..hypernet.lowrank import patched_overflow
from ..hypernet.merge import LAYER_POLICIES, LAYER_POLICY_HELP, STRENGTH_LIMIT, MergedLora, Strengths, merge_loras
from ..hypernet.model_keys import lora_for_model, target_key
from .attention_roles import attention_roles, unknown_attention_classes
from .klora_patch import patch_switched
from .common import CATEGORY, HYPERNET_TYPE, MERGED_TYPE, fingerprint, model_class, model_layout

# The last merge, keyed by the inputs' content (files' sha256, hypernet, method, parameters, strengths, layout):
# re-running a graph where only the prompt or the sampler changed reuses it. One entry, so ComfyUI's own
# cache settings still bound what stays in memory.
_MERGES: "OrderedDict[tuple, MergedLora]" = OrderedDict()
_MERGES_MAX = 1


def _remember(key, merged: MergedLora) -> MergedLora:
    _MERGES[key] = merged
    _MERGES.move_to_end(key)
    while len(_MERGES) > _MERGES_MAX:
        _MERGES.popitem(last=False)
    return merged


def _base_model_note(name: str | None, model) -> str:
    """A line for the report when the hypernet was trained on another member of the SDXL family."""
    info = load_manifest().get(name) if name else None
    if info is None or model_class(model) in info.comfy_model_classes[:1]:
        return ""
    return (f"note: the {info.name} hypernet was trained on {info.comfy_model_classes[0]} LoRAs; this model is "
            f"{model_class(model)} (same attention widths)")


def _strength(tooltip: str):
    return ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01, "tooltip": tooltip})


def param_inputs() -> dict:
    """Every registered method's own parameters as optional inputs, e.g. ``np_lora_mu``."""
    return {methods.param_key(method, param): ("FLOAT", {
        "default": param.default, "min": param.minimum, "max": param.maximum, "step": param.step,
        "tooltip": f"{method.name} only: {param.help}"}) for method in methods.all_methods() for param in method.params}


def params_for(method: str, given: dict) -> dict[str, float]:
    rule = methods.get(method)
    return {param.name: given[methods.param_key(rule, param)] for param in rule.params
            if methods.param_key(rule, param) in given}


def read_for_model(path: str, key_map: dict, shapes: dict, layout, text_encoders: bool) -> LoraFile:
    """A LoRA file's layers as this model's key map sends them (ComfyUI's own conversions applied first)."""
    tensors = comfy.lora_convert.convert_lora(read_state_dict(path, "LoRA"))
    return lora_for_model(tensors, path, key_map, shapes, fingerprint(path), layout, host="ComfyUI's key map",
                          text_encoders=text_encoders)


def _merge_files(subject_path, style_path, net, method, layer_policy, strengths, model, clip, params,
                 roles: dict[str, str]) -> MergedLora:
    layout = model_layout(model)
    key_map, weights = model_key_map(model, clip), model_weights(model, clip)
    shapes = {key: tuple(weight.shape) for key, weight in weights.items()}
    with unforeseen_as_error(f"{subject_path} + {style_path}"):
        subject = read_for_model(subject_path, key_map, shapes, layout, clip is not None)
        style = read_for_model(style_path, key_map, shapes, layout, clip is not None)
        bar = comfy.utils.ProgressBar(1)
        # checked against the model itself: a LoRA for another base model is refused whatever the method
        return merge_loras(subject, style, net, method, layer_policy, strengths, layout=layout,
                           device=comfy.model_management.get_torch_device(), params=params,
                           progress=lambda done, total: bar.update_absolute(done, total), family=model_class(model),
                           roles=roles)


def _model_signature(model, clip) -> tuple:
    """What decides how a file's layers are read for this model: its family and widths, the text encoders."""
    return (model_class(model), str(model.model.model_config.unet_config),
            type(clip.cond_stage_model).__name__ if clip is not None else None)


class LoraRarMerge:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", MERGED_TYPE, "STRING")
    RETURN_NAMES = ("model", "clip", "merged_lora", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the merged LoRA applied.",
        "The CLIP with the merged LoRA's text-encoder layers applied (None when no CLIP was connected).",
        "The merged LoRA, for the save node.",
        "What happened to every layer: merged by the hypernetwork, summed, kept or skipped, and why.",
    )
    FUNCTION = "merge"
    DESCRIPTION = (
        "LoRA.rar: merges a subject LoRA and a style LoRA with a pretrained hypernetwork that predicts, per "
        "column of each attention update, how much of the subject and of the style to keep (arXiv 2412.05148). "
        "The result is one ordinary low-rank LoRA patched onto the model through ComfyUI's own LoRA patching. "
        "Method 'direct' adds the two LoRAs (what two stacked LoRA loaders do)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the merged LoRA to: SDXL family, KOALA-700M, Flux, SD3.5, ... (lorarar and b-lora serve only some families; the error says which)."}),
                "hypernet": (HYPERNET_TYPE, {"tooltip": "From the LoRA.rar Hypernet Loader node."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA: your dog, your character."}),
                "style_lora": (loras, {"tooltip": "The style LoRA: watercolour, 3D render, ..."}),
                "subject_strength": _strength("Scales the subject's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "style_strength": _strength("Scales the style's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "subject_clip_strength": _strength("Scales the subject LoRA's text-encoder layers."),
                "style_clip_strength": _strength("Scales the style LoRA's text-encoder layers."),
                "method": (list(methods.names()), {"default": "lorarar", "tooltip": "; ".join(
                    f"{method.name}: {method.help}" for method in methods.all_methods())}),
                "layer_policy": (list(LAYER_POLICIES), {"default": "sum", "tooltip": LAYER_POLICY_HELP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoders, for LoRAs that also train them. Leave empty to patch the model only."}),
                **param_inputs(),
            },
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        # the merge depends on the files' content, not only their names
        if subject_lora is None or style_lora is None:
            return float("nan")  # names wired from another node: not known here, so always run (cheap when cached)
        hashes = []
        for name in (subject_lora, style_lora):
            path = folder_paths.get_full_path("loras", name)
            hashes.append(fingerprint(path) if path else str(name))
        return "|".join(hashes)

    def merge(self, model, hypernet, subject_lora, style_lora, subject_strength, style_strength,
              subject_clip_strength, style_clip_strength, method, layer_policy, clip=None, **method_params):
        strengths = Strengths(subject_strength, style_strength, subject_clip_strength, style_clip_strength)
        params = params_for(method, method_params)
        subject_path = folder_paths.get_full_path_or_raise("loras", subject_lora)
        style_path = folder_paths.get_full_path_or_raise("loras", style_lora)
        net, name = None, None
        if methods.get(method).needs_hypernet:
            net, _, name = hypernet.for_model(model)
        # the roles decide what k-lora / lorarar do per layer, and two models of one class and unet_config can
        # differ in them (a node pack's own attention modules): they are part of the key (a few ms on a 12B model)
        with unforeseen_as_error(f"{model_class(model)} model's attention modules"):
            roles = attention_roles(getattr(model.model, "diffusion_model", None))
        key = (fingerprint(subject_path), fingerprint(style_path), net.sha256 if net else None,
               method, tuple(sorted(params.items())), layer_policy, strengths, _model_signature(model, clip),
               tuple(sorted(roles.items())))
        merged = _MERGES.get(key) or _merge_files(subject_path, style_path, net, method, layer_policy, strengths,
                                                  model, clip, params, roles)
        _remember(key, merged)
        # the names (and paths) given now, also when the merge itself was reused for files of the same content
        merged = merged.named(subject_lora, style_lora, subject_path, style_path)
        model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
        notes = [_base_model_note(name, model), _unknown_attention_note(method, model)]
        trained = f"hypernet {net.describe(name)}" if net is not None and net.training_metadata else ""
        return (model_out, clip_out, applied,
                "\n".join(filter(None, [applied.report.to_text(), applied_text, *notes, trained])))


def _unknown_attention_note(method: str, model) -> str:
    """A line for the report when a method that treats attention apart meets attention classes the pack's table
    lacks: their linears get no role, so they follow the layer policy (a new ComfyUI family, a custom model)."""
    unknown = unknown_attention_classes(model.model.diffusion_model) if methods.get(method).needs_roles else []
    return (f"note: {len(unknown)} attention classes of this model are not in the pack's table ({', '.join(unknown[:3])}): "
            "their linears follow the layer policy" if unknown else "")


def model_key_map(model, clip) -> dict:
    """ComfyUI's map from every LoRA layer name it reads to the weight (or band of one) it patches."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map) if clip is not None else key_map


def model_weights(model, clip) -> dict:
    """Every weight and bias the key map can name (the tensors themselves, not copies): the UNet's, and the
    text encoders' when connected."""
    weights = dict(model.model.state_dict())
    if clip is not None:
        weights.update(clip.cond_stage_model.state_dict())
    return weights


def _target_weight(target, weights: dict):
    """The part of a model weight a key-map entry patches: a key, or (key, (dim, start, length), ...)."""
    weight = weights[target_key(target)]
    return weight if isinstance(target, str) else weight.narrow(*target[1])


def _patch_dtype(model, weight) -> "torch.dtype":
    """The narrowest float type the patch of ``weight`` passes through: the weight's own, or float16 where
    ComfyUI (0.33+) computes LoRA arithmetic in float16 on this device."""
    compute = getattr(comfy.model_management, "lora_compute_dtype", None)
    narrow = [weight.dtype, compute(model.load_device) if compute else weight.dtype]
    return next((d for d in (torch.float16, torch.bfloat16) if d in narrow), torch.float32)


def _overflows(model, applied: MergedLora, key_map: dict, weights: dict, names: list[str]) -> None:
    """Refuse a merge whose patch would put Inf or NaN into the model's weights (e.g. float16 ones)."""
    for name in names:
        weight = _target_weight(key_map[name], weights)
        dtype = _patch_dtype(model, weight)
        largest = patched_overflow(applied.layers[name], weight, dtype)
        if largest is not None:
            raise LoraRarError(
                f"layer {name} of {' + '.join(applied.files_of(name))}: patched into this model's {dtype} weights it "
                f"would reach {largest:.3g} (the most {dtype} holds is {torch.finfo(dtype).max:.3g}): lower the strengths")


def _switched_overflows(model, merged: MergedLora, key_map: dict, weights: dict) -> None:
    """K-LoRA's switched layers add a side's update in the layer's forward, in the model's compute dtype: refuse
    one that would overflow there, as a static patch of the same update would (each side checked alone)."""
    for name, layer in (merged.switch.layers.items() if merged.switch is not None else ()):
        if not _in_model(name, key_map, weights) or layer.subject.misfit(*_target_shape(key_map[name], weights)):
            continue  # not switched in this model: patch_switched reports it
        weight = _target_weight(key_map[name], weights)
        dtype = _patch_dtype(model, weight)
        for side, update in (("subject", layer.subject), ("style", layer.style)):
            largest = patched_overflow(update, weight, dtype)
            if largest is not None:
                raise LoraRarError(
                    f"layer {name} of {getattr(merged.report, side)} ({merged.report.method}, {side} side): added to "
                    f"this model's {dtype} weights it would reach {largest:.3g} (the most {dtype} holds is "
                    f"{torch.finfo(dtype).max:.3g}): lower the strengths")


def _shared_targets(names: list[str], key_map: dict) -> None:
    """Two layer names for one model weight: ComfyUI would apply only one of them, silently."""
    seen: dict[str, str] = {}
    for name in names:
        key = target_key(key_map[name])
        if key in seen:
            raise LoraRarError(f"layers {seen[key]} and {name} both patch {key} (the same layer named two ways, "
                               "e.g. lora_te_ and lora_te1_); ComfyUI would apply only one: rename one of them")
        seen[key] = name


def _target_shape(target, weights) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(weight shape, bias shape or None) a key-map entry patches."""
    key = target_key(target)
    bias = weights.get(key[:-len(".weight")] + ".bias") if key.endswith(".weight") else None
    return tuple(_target_weight(target, weights).shape), (tuple(bias.shape) if bias is not None else None)


def _in_model(name: str, key_map: dict, weights: dict) -> bool:
    """Whether ComfyUI's patcher will find a weight for layer ``name`` (it silently drops the others)."""
    target = key_map.get(name)
    return target is not None and target_key(target) in weights


def _misfits(merged: MergedLora, key_map: dict, weights: dict) -> dict[str, str]:
    """Layer -> why its patch would not apply as meant (ComfyUI skips a wrong shape, or reshapes it scrambled)."""
    misfits = {}
    for name, layer in merged.layers.items():
        if not _in_model(name, key_map, weights):
            continue  # not in this model: reported separately
        why = layer.misfit(*_target_shape(key_map[name], weights))
        if why:
            misfits[name] = f"{why} (from {' + '.join(merged.files_of(name))})"
    return misfits


# The last apply_merged verdict (layers that fit, overflow check, the state dict to patch): a re-run where
# only the prompt or the seed changed reuses it and costs what ComfyUI's own patching costs. Keyed by the
# objects themselves (weak references: a model that is let go is not kept alive) and by what else decides
# the verdict: the weights' dtypes and devices, the compute dtype of LoRA patches, the patches already on
# the incoming MODEL/CLIP.
_VERDICT: dict = {}


def _verdict_key(model, clip) -> tuple:
    compute = getattr(comfy.model_management, "lora_compute_dtype", None)
    weights = [model.model] + ([clip.cond_stage_model] if clip is not None else [])
    return (tuple(frozenset((p.dtype, p.device) for p in module.parameters()) for module in weights),
            compute(model.load_device) if compute else None, model.patches_uuid,
            clip.patcher.patches_uuid if clip is not None else None)


def _cached_verdict(model, clip, merged: MergedLora):
    """(applied, patched names, state dict, text, key map) of :func:`_verdict`, reused while nothing it read changed."""
    key = _verdict_key(model, clip)
    objects = (merged, model.model, clip.cond_stage_model if clip is not None else None)
    cached = _VERDICT.get("entry")
    if cached is not None and cached[0] == key and all(
            (ref() if ref is not None else None) is obj for ref, obj in zip(cached[1], objects)):
        return cached[2]
    verdict = _verdict(model, clip, merged)
    _VERDICT["entry"] = (key, tuple(weakref.ref(obj) if obj is not None else None for obj in objects), verdict)
    return verdict


def _verdict(model, clip, merged: MergedLora):
    """Which merged layers this model can take and the kohya state dict that patches them; refuses merges
    that fit nowhere, name one weight twice, or would overflow the model's weights."""
    key_map, weights = model_key_map(model, clip), model_weights(model, clip)
    misfits = _misfits(merged, key_map, weights)
    applied = merged.without(misfits) if misfits else merged
    unknown = [name for name in applied.layers if not _in_model(name, key_map, weights)]
    patched = [name for name in applied.layers if name not in unknown]
    switched = merged.switch.layers if merged.switch is not None else {}
    if not patched and not any(_in_model(name, key_map, weights) for name in switched):
        example = next(iter(misfits.items()), None)
        raise LoraRarError(f"{merged.report.subject} + {merged.report.style}: none of the merged layers fits this "
                           f"{model_class(model)} model" + (f" (e.g. {example[0]}: {example[1]})" if example else "")
                           + "; are the LoRAs for another base model?")
    _shared_targets(patched, key_map)
    _overflows(model, applied, key_map, weights, patched)
    _switched_overflows(model, merged, key_map, weights)
    # each layer as merged (float32 where float16 would overflow); the layers not in this model are left out
    state_dict = to_kohya_state_dict({name: applied.layers[name] for name in patched}, dtype=None)
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
    return applied, patched, state_dict, text, key_map


def apply_merged(model, clip, merged: MergedLora):
    """Patch MODEL/CLIP with the merged LoRA through ComfyUI's key map and patcher.

    Returns (model, clip, the merged LoRA as applied, text): layers whose shape does not fit the model are
    left out of the patch and of the returned LoRA (so a saved file holds only what was applied here), and
    listed with their file; layers the model does not have stay in the LoRA and are counted as not applied.
    """
    applied, patched, state_dict, text, key_map = _cached_verdict(model, clip, merged)
    model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, state_dict, 1.0, 1.0)
    if merged.switch is not None:  # k-lora: chosen per sampling step, not a weight patch
        model_out, count, switched_text = patch_switched(model_out, merged.switch, key_map)
        if not count and not patched:
            raise LoraRarError(f"{merged.report.subject} + {merged.report.style}: {switched_text}")
        text += f"; {switched_text}"
    return model_out, clip_out, applied, text
