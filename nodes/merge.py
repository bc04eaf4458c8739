"""Merge node: two LoRA files + the hypernet -> one merged low-rank LoRA patched onto MODEL and CLIP."""

from __future__ import annotations

from collections import OrderedDict

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from ..hypernet.checkpoints import for_model_class, load_hypernet, load_manifest
from ..hypernet.errors import LoraRarError, unforeseen_as_error
from ..hypernet.lora_io import read_lora
from ..hypernet.merge import LAYER_POLICIES, LAYER_POLICY_HELP, METHODS, STRENGTH_LIMIT, MergedLora, Strengths, merge_loras
from .common import CATEGORY, HYPERNET_TYPE, MERGED_TYPE, download_dir, fingerprint, hypernet_dirs, model_class, model_layout

# Identical inputs (by content) reuse the last merge, e.g. when only the prompt or the model upstream changed;
# one entry, so ComfyUI's own cache settings still bound what stays in memory.
_MERGES: "OrderedDict[tuple, MergedLora]" = OrderedDict()
_HYPERNETS: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 1


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _base_model_note(base, model) -> str:
    """A line for the report when the hypernet was trained on another member of the SDXL family."""
    if base is None:
        return ""
    trained_on = {"sdxl": "SDXL", "koala-700m": "KOALA_700M"}.get(base.name, base.name)
    if model_class(model) == trained_on:
        return ""
    return f"note: the {base.name} hypernet was trained on {trained_on} LoRAs; this model is {model_class(model)} (same attention widths)"


def _strength(tooltip: str):
    return ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01, "tooltip": tooltip})


def _hypernet_for(choice: str, model):
    """(hypernet, base layout) for 'auto', a published name or a file in a lorarar folder; loaded once."""
    name = for_model_class(model_class(model)).name if choice == "auto" else choice
    source = name if name in load_manifest() else folder_paths.get_full_path_or_raise("lorarar", name)
    key = name if source == name else (name, fingerprint(source))  # own files: a new file under the old name counts
    if key not in _HYPERNETS:
        _remember(_HYPERNETS, key, load_hypernet(source, hypernet_dirs(), download_dir()))
    return _HYPERNETS[key]


def _merge_files(subject_path, style_path, net, method, layer_policy, strengths, layout) -> MergedLora:
    with unforeseen_as_error(f"{subject_path} + {style_path}"):
        subject = read_lora(subject_path, layout)
        style = read_lora(style_path, layout)
        bar = comfy.utils.ProgressBar(1)
        # checked against the model itself: a LoRA for another base model is refused whatever the method
        return merge_loras(subject, style, net, method, layer_policy, strengths, base=layout,
                           device=comfy.model_management.get_torch_device(),
                           progress=lambda done, total: bar.update_absolute(done, total))


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
                "model": ("MODEL", {"tooltip": "The diffusion model (SDXL family or KOALA-700M) to apply the merged LoRA to."}),
                "hypernet": (HYPERNET_TYPE, {"tooltip": "From the LoRA.rar Hypernet Loader node."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA: your dog, your character."}),
                "style_lora": (loras, {"tooltip": "The style LoRA: watercolour, 3D render, ..."}),
                "subject_strength": _strength("Scales the subject's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "style_strength": _strength("Scales the style's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "subject_clip_strength": _strength("Scales the subject LoRA's text-encoder layers."),
                "style_clip_strength": _strength("Scales the style LoRA's text-encoder layers."),
                "method": (list(METHODS), {"default": "lorarar", "tooltip": "lorarar: the hypernetwork merge; direct: plain sum of both LoRAs, for comparison."}),
                "layer_policy": (list(LAYER_POLICIES), {"default": "sum", "tooltip": LAYER_POLICY_HELP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoders, for LoRAs that also train them. Leave empty to patch the model only."}),
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
              subject_clip_strength, style_clip_strength, method, layer_policy, clip=None):
        strengths = Strengths(subject_strength, style_strength, subject_clip_strength, style_clip_strength)
        subject_path = folder_paths.get_full_path_or_raise("loras", subject_lora)
        style_path = folder_paths.get_full_path_or_raise("loras", style_lora)
        layout = model_layout(model)
        net, base = (None, None)
        if method == "lorarar":
            net, base = _hypernet_for(hypernet.choice, model)
        note = _base_model_note(base, model)
        key = (fingerprint(subject_path), fingerprint(style_path), net.sha256 if net else None,
               method, layer_policy, strengths, layout)
        merged = _MERGES.get(key)
        if merged is None:
            merged = _merge_files(subject_path, style_path, net, method, layer_policy, strengths, layout)
            merged.report.subject, merged.report.style = subject_lora, style_lora
        _remember(_MERGES, key, merged)
        model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
        return (model_out, clip_out, applied, "\n".join(filter(None, [applied.report.to_text(), applied_text, note])))


def _weight_shapes(model, clip) -> dict[str, tuple[int, ...]]:
    """Shape of every weight and bias the key map can name: the UNet's, and the text encoders' when connected."""
    shapes = {key: tuple(tensor.shape) for key, tensor in model.model.state_dict().items()}
    if clip is not None:
        shapes.update((key, tuple(tensor.shape)) for key, tensor in clip.cond_stage_model.state_dict().items())
    return shapes


def _target_shape(target, shapes) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(weight shape, bias shape or None) a key-map entry patches: a key, or (key, (dim, start, length), ...)."""
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    shape = list(shapes[key])
    if offset is not None:
        shape[offset[0]] = offset[2]
    return tuple(shape), shapes.get(key[:-len(".weight")] + ".bias") if key.endswith(".weight") else None


def _in_model(name: str, key_map: dict, shapes: dict) -> bool:
    """Whether ComfyUI's patcher will find a weight for layer ``name`` (it silently drops the others)."""
    target = key_map.get(name)
    return target is not None and (target if isinstance(target, str) else target[0]) in shapes


def _misfits(merged: MergedLora, key_map: dict, shapes: dict) -> dict[str, str]:
    """Layer -> why its patch would not apply as meant (ComfyUI skips a wrong shape, or reshapes it scrambled)."""
    misfits = {}
    for name, layer in merged.layers.items():
        if not _in_model(name, key_map, shapes):
            continue  # not in this model: reported separately
        why = layer.misfit(*_target_shape(key_map[name], shapes))
        if why:
            misfits[name] = f"{why} (from {' + '.join(merged.files_of(name))})"
    return misfits


def apply_merged(model, clip, merged: MergedLora):
    """Patch MODEL/CLIP with the merged LoRA through ComfyUI's key map and patcher.

    Returns (model, clip, the merged LoRA as applied, text): layers whose shape does not fit the model are
    left out of the patch and of the returned LoRA (so a saved file holds only what was applied here), and
    listed with their file; layers the model does not have stay in the LoRA and are counted as not applied.
    """
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    shapes = _weight_shapes(model, clip)
    misfits = _misfits(merged, key_map, shapes)
    applied = merged.without(misfits) if misfits else merged
    unknown = [name for name in applied.layers if not _in_model(name, key_map, shapes)]
    state_dict = applied.kohya_state_dict(dtype=None)  # each layer as merged (float32 where float16 would overflow)
    for name in unknown:
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff_b"):
            state_dict.pop(name + suffix, None)
    if not state_dict:
        example = next(iter(misfits.items()), None)
        raise LoraRarError(f"{merged.report.subject} + {merged.report.style}: none of the merged layers fits this "
                           f"{model_class(model)} model" + (f" (e.g. {example[0]}: {example[1]})" if example else "")
                           + "; are the LoRAs for another base model?")
    model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, state_dict, 1.0, 1.0)
    text = f"applied to the model: {len(applied.layers) - len(unknown)} layers"
    if misfits:
        text += (f"; not applied: {len(misfits)} layers whose shape does not fit this model: "
                 + "; ".join(f"{name}: {why}" for name, why in list(misfits.items())[:5])
                 + (f"; and {len(misfits) - 5} more" if len(misfits) > 5 else ""))
    if unknown:
        text_layers = sum(1 for n in unknown if n.startswith("lora_te"))
        text += (f"; not applied: {len(unknown)} layers not in this model"
                 + (f" ({text_layers} text-encoder layers: connect a CLIP)" if text_layers and clip is None else "")
                 + f", e.g. {unknown[0]}")
    return model_out, clip_out, applied, text
