"""What the pack reads from a loaded ComfyUI MODEL / CLIP: its family and layout, ComfyUI's LoRA key map, its
weights and layer shapes, and LoRA files read through that key map (one reader for the merge, ZipLoRA and
training); and a merged LoRA applied to it (``apply_merged``: fit.py's verdict on this view, then ComfyUI's own
LoRA patching and the runtime part). The key map itself is ComfyUI's (comfy.lora.model_lora_keys_unet / _clip):
never a copy of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.sd
import folder_paths

from ...hypernet.base_models import UNetLayout
from ...hypernet.cache import BoundedCache
from ...hypernet.errors import LoraRarError, unforeseen_as_error
from ...hypernet.files import file_sha256, read_state_dict
from ...hypernet.layers import LoraFile, LowRankLayer
from ...hypernet.model_keys import canonical_names, lora_for_model
from .fit import apply_runtime, verdict

if TYPE_CHECKING:
    from ...hypernet.result import MergedLora

_UNET = "diffusion_model."


def lora_path(name: str) -> str:
    """The full path of a LoRA the node names; ComfyUI's own one-line error when it is not in models/loras."""
    return folder_paths.get_full_path_or_raise("loras", name)


def model_class(model) -> str:
    """ComfyUI's name of the model's family: its model_config class ("SDXL", "Flux", "WAN21", ...)."""
    return type(model.model.model_config).__name__


def model_layout(model) -> UNetLayout | None:
    """The model's UNet layout; None for models that are no SDXL-style UNet (Flux, SD3, ...): their layers are
    matched through ComfyUI's key map alone, and the methods that need a UNet layout say so by family."""
    config = model.model.model_config.unet_config
    try:
        return UNetLayout.from_unet_config(model_class(model), config)
    except (KeyError, TypeError):
        return None


def model_signature(model, clip) -> tuple:
    """What decides how a file's layers are read for this model: its family and widths, the text encoders."""
    return (model_class(model), str(model.model.model_config.unet_config),
            type(clip.cond_stage_model).__name__ if clip is not None else None)


def model_key_map(model, clip) -> dict:
    """ComfyUI's map from every LoRA layer name it reads to the weight (or band of one) it patches."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map) if clip is not None else key_map


def model_weights(model, clip) -> dict:
    """Every weight and bias the key map can name (the tensors themselves, not copies): the diffusion model's,
    and the text encoders' when connected."""
    weights = dict(model.model.state_dict())
    if clip is not None:
        weights.update(clip.cond_stage_model.state_dict())
    return weights


def weight_shapes(weights: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of every weight of :func:`model_weights` (what the readers check a LoRA's layers against)."""
    return {key: tuple(weight.shape) for key, weight in weights.items()}


class ModelView:
    """One loaded MODEL (and CLIP, if any) as the readers see it: key map, shapes and layout, built once."""

    def __init__(self, model, clip=None):
        self.model, self.clip = model, clip
        self.key_map = model_key_map(model, clip)
        self.weights = model_weights(model, clip)
        self.shapes = weight_shapes(self.weights)
        self.layout = model_layout(model)
        self.family = model_class(model)

    def read(self, path: str) -> LoraFile:
        """A LoRA file's layers as this model's key map sends them (ComfyUI's own conversions applied first)."""
        tensors = comfy.lora_convert.convert_lora(read_state_dict(path, "LoRA"))
        return lora_for_model(tensors, path, self.key_map, self.shapes, file_sha256(path), self.layout,
                              host="ComfyUI's key map", text_encoders=self.clip is not None)

    def read_pair(self, subject_path: str, style_path: str) -> tuple[LoraFile, LoraFile]:
        """(subject, style), any unforeseen failure as a one-line error naming both files."""
        with unforeseen_as_error(f"{subject_path} + {style_path}"):
            return self.read(subject_path), self.read(style_path)

    def module_paths(self) -> dict[str, str]:
        """Canonical layer name -> the diffusion-model module it patches, as an attribute path under
        ``model.model`` (``diffusion_model.input_blocks.4.1...attn1.to_q``), for the modules the model has
        (ComfyUI's key map also names those other models of the family have)."""
        names = canonical_names(model_key_map(self.model, None))
        return {name: key[:-len(".weight")] for key, name in names.items()
                if key.startswith(_UNET) and key in self.weights}


def diffusion_layers(lora: LoraFile, paths: dict[str, str]) -> dict[str, LowRankLayer]:
    """The plain low-rank layers of a LoRA that patch a diffusion-model module (text-encoder layers are not part
    of a runtime branch; :func:`unsupported_layers` lists the other diffusion-model layers first)."""
    return {name: layer for name, layer in lora.layers.items() if name in paths and isinstance(layer, LowRankLayer)}


def unsupported_layers(lora: LoraFile, paths: dict[str, str]) -> dict[str, str]:
    """Diffusion-model layers of a LoRA a factored branch cannot run, name -> what they are: adapters that are
    not up @ down (LoHa, LoKr, DoRA, ...) and convs with a kernel other than 1x1 (LoCon's 3x3), whose branch
    would need the layer's own convolution. Left out, they would silently vanish from the result."""
    found = {}
    for name, layer in lora.layers.items():
        if name not in paths:
            continue
        if not isinstance(layer, LowRankLayer):
            found[name] = layer.kind
        elif layer.conv_kernel != ():
            found[name] = f"{'x'.join(map(str, layer.conv_kernel))} conv"
    return found


def refuse_unsupported(lora: LoraFile, paths: dict[str, str], what: str) -> None:
    """One line naming the file when it has diffusion-model layers a factored branch cannot run."""
    unsupported = unsupported_layers(lora, paths)
    if unsupported:
        name, kind = next(iter(unsupported.items()))
        raise LoraRarError(f"{what}: {lora.path} has {len(unsupported)} diffusion-model layers the optimisation "
                           f"cannot run (e.g. {name}: {kind}); it optimises plain LoRA layers (linear or 1x1 conv) "
                           "only: use the merge node for this file")


# The last verdict: a re-run where only the prompt or the seed changed reuses it and costs what ComfyUI's own
# patching costs. Valid for the same merge, model and CLIP objects (held weakly), and keyed by what else decides
# it: the weights' dtypes and devices, the compute dtype of LoRA patches, the patches already on MODEL / CLIP.
VERDICTS: BoundedCache = BoundedCache(1, "weights' dtypes and devices, LoRA compute dtype, incoming patches")


def _verdict_key(model, clip) -> tuple:
    compute = getattr(comfy.model_management, "lora_compute_dtype", None)
    modules = [model.model] + ([clip.cond_stage_model] if clip is not None else [])
    return (tuple(frozenset((p.dtype, p.device) for p in module.parameters()) for module in modules),
            compute(model.load_device) if compute else None, model.patches_uuid,
            clip.patcher.patches_uuid if clip is not None else None)


def _viewed_verdict(model, clip, merged: MergedLora) -> tuple:
    """fit.py's verdict on a fresh view of MODEL / CLIP, and the view (the runtime part is injected through it)."""
    view = ModelView(model, clip)
    return (*verdict(view, merged), view)


def apply_merged(model, clip, merged: MergedLora):
    """Patch MODEL/CLIP with the merged LoRA through ComfyUI's key map and patcher, and inject its runtime part.

    Returns (model, clip, the merged LoRA as applied, text): layers whose shape does not fit the model are
    left out of the patch and of the returned LoRA (so a saved file holds only what was applied here), and
    listed with their file; layers the model does not have stay in the LoRA and are counted as not applied.
    """
    objects = (merged, model.model, clip.cond_stage_model if clip is not None else None)
    found, _ = VERDICTS.get_or_make(_verdict_key(model, clip), lambda: _viewed_verdict(model, clip, merged), objects)
    applied, patched, state_dict, text, view = found
    model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, state_dict, 1.0, 1.0)
    if merged.runtime is not None:
        model_out, injected, runtime_text = apply_runtime(model_out, merged, view)
        if not injected and not patched:
            raise LoraRarError(f"{merged.report.subject} + {merged.report.style}: {runtime_text}")
        text += f"; {runtime_text}"
    return model_out, clip_out, applied, text
