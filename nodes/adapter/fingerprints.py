"""Content keys of a cached result that ran the model (a ZipLoRA optimisation, a calibration): hashes of the tensors
it read and what is on the model beside its loaded module (which the caches hold by identity). A leaf: hashlib and
torch only, so any adapter module can key its cache without importing the model's key maps."""

from __future__ import annotations

import hashlib

import torch


def hash_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def conditioning_tensors(conditioning: list) -> list[torch.Tensor]:
    """The tensors of a ComfyUI CONDITIONING (cross attention and the extras, e.g. the pooled output)."""
    return [t for cross_attn, extras in conditioning
            for t in (cross_attn, *(v for _, v in sorted(extras.items()) if isinstance(v, torch.Tensor)))]


def conditioning_settings(conditioning: list) -> str:
    """What a ComfyUI CONDITIONING carries beside its tensors, which the model's extra_conds read as well (SDXL's
    width / height / crops from CLIPTextEncodeSDXL, Flux's guidance from FluxGuidance, a list of reference latents):
    two conditionings with equal tensors but other settings condition the model differently."""
    def setting(value) -> str:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return hash_tensors(*value)
        return repr(value)
    return repr([[(key, setting(value)) for key, value in sorted(extras.items()) if not isinstance(value, torch.Tensor)]
                 for _, extras in conditioning])


def model_fingerprint(model) -> str:
    """What a result that ran ``model`` depends on beside the loaded diffusion model itself, which the caches hold
    as an object (``objects=(model.model,)``: compared by identity, held weakly): the weight patches on this patcher
    and what changes its forward. Not the weights' values: ComfyUI patches a loaded clone's LoRAs into the shared
    module in place, so they read differently after every sampler run; the module object is the checkpoint."""
    digest = hashlib.sha256(type(model.model.model_config).__name__.encode())
    if model.patches:  # a LoRA loaded upstream changes what the merge is optimised on
        digest.update(f"{sorted(model.patches)}|{model.patches_uuid}".encode())
    digest.update(_forward_changes(model).encode())
    return digest.hexdigest()


def _forward_changes(model) -> str:
    """What changes the model's forward without touching its weights: object patches (a K-LoRA merge upstream,
    another pack's replaced forward), wrappers and transformer_options patches, by name and object (the same
    upstream node output on a re-run is the same object)."""
    options = model.model_options.get("transformer_options", {})
    parts = [(name, type(value).__qualname__, id(value)) for name, value in sorted(model.object_patches.items())]
    parts += [(kind, key, tuple(map(id, wrappers))) for kind, by_key in sorted(getattr(model, "wrappers", {}).items())
              for key, wrappers in sorted(by_key.items()) if wrappers]
    parts += [(group, _leaves(options[group])) for group in ("patches", "patches_replace") if options.get(group)]
    return repr(parts)


def _leaves(tree) -> list:
    """(path, type, id) of each callable in a transformer_options patch dict (clones copy the dicts, not these)."""
    if isinstance(tree, dict):
        return [(repr(key), _leaves(value)) for key, value in sorted(tree.items(), key=lambda item: repr(item[0]))]
    if isinstance(tree, (list, tuple)):
        return [_leaves(value) for value in tree]
    return [(type(tree).__qualname__, id(tree))]
