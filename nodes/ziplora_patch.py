"""The ZipLoRA merge (hypernet/ziplora.py) injected into the MODEL ComfyUI loaded, so its coefficients train
through ComfyUI's own model forward.

Which ComfyUI mechanism, and why (checked on both tested hosts, 0.3.75 and 0.33.0):
- ``ModelPatcher.add_weight_wrapper`` (comfy/ops.py ``weight_function``; what 0.3.75's TrainLoraNode uses)
  exists on both, but it hands the wrapper the whole weight and expects the whole patched weight back: a
  dense d_out x d_in update per layer per forward, which this merge must never form;
- bypass injection (comfy/weight_adapter/bypass.py, adapters' ``h(x)``; 0.33.0's TrainLoraNode
  ``bypass_mode``) adds a branch to a layer's output as we need, but 0.3.75 has no such module;
- ``ModelPatcher.add_object_patch`` exists on both and is what bypass injection itself amounts to: it
  replaces ``<module>.forward`` while ComfyUI loads the model (patch_model) and restores it on unload. So
  each LoRA layer's ``forward`` is object-patched with base forward + the factored branch.
The base weights are never touched (they stay whatever ComfyUI loaded, patched or not), the LoRA factors
are frozen buffers of the merge, and the coefficients are its only Parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import comfy.model_management
import torch

from ..hypernet.lora_io import LoraFile, LowRankLayer
from ..hypernet.model_keys import canonical_names
from ..hypernet.ziplora import ZipLoraMerge, ZipLoraLayer
from .merge import model_key_map

_UNET = "diffusion_model."


def module_paths(model) -> dict[str, str]:
    """Canonical layer name -> the diffusion-model module it patches, as an attribute path under
    ``model.model`` (``diffusion_model.input_blocks.4.1...attn1.to_q``), from ComfyUI's key map."""
    names = canonical_names(model_key_map(model, None))
    return {name: key[:-len(".weight")] for key, name in names.items() if key.startswith(_UNET)}


def diffusion_layers(lora: LoraFile, paths: dict[str, str]) -> dict[str, LowRankLayer]:
    """The plain low-rank layers of a LoRA that patch a diffusion-model module (text-encoder layers are not part
    of ZipLoRA; the node refuses a file with other diffusion-model layers first: :func:`unsupported_layers`)."""
    return {name: layer for name, layer in lora.layers.items() if name in paths and isinstance(layer, LowRankLayer)}


def unsupported_layers(lora: LoraFile, paths: dict[str, str]) -> dict[str, str]:
    """Diffusion-model layers of a LoRA the factored branch cannot run, name -> what they are: adapters that are
    not up @ down (LoHa, LoKr, DoRA, ...) and convs with a kernel other than 1x1 (LoCon's 3x3), whose branch
    would need the layer's own convolution. Left out, they would silently vanish from the merged result."""
    found = {}
    for name, layer in lora.layers.items():
        if name not in paths:
            continue
        if not isinstance(layer, LowRankLayer):
            found[name] = layer.kind
        elif layer.conv_kernel != ():
            found[name] = f"{'x'.join(map(str, layer.conv_kernel))} conv"
    return found


def branch_forward(original, layer_now: Callable[[], ZipLoraLayer | None]):
    """forward(x, ...) = original(x, ...) + the branch on x of the layer ``layer_now()`` gives (none: nothing added).
    The ZipLoRA node's layer is fixed; training routes each call to the layer of the pair of the moment."""
    def forward(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        layer = layer_now()
        extra = layer.extra(x) if layer is not None else None
        return out if extra is None else out + extra.to(out.dtype)
    return forward


def inject(model, merge: ZipLoraMerge):
    """A clone of MODEL whose LoRA layers run ``merge``'s branch (object patches of their ``forward``).

    The merge's tensors move to the model's load device; the switch ``merge.branch(...)`` chooses per call
    what the layers add (merged, subject only, style only, nothing).
    """
    paths = module_paths(model)
    patched = model.clone()
    merge.to(model.load_device)
    for name, layer in merge.layers.items():
        layer.channels_first = isinstance(patched.get_model_object(paths[name]), torch.nn.Conv2d)
        attribute = f"{paths[name]}.forward"
        # the current forward, which is an earlier object patch when one exists: chained, not replaced
        patched.add_object_patch(attribute, branch_forward(patched.get_model_object(attribute), lambda layer=layer: layer))
    return patched


@dataclass
class NoisedBatch:
    """One branch input: x (B, C, H, W) noised latents in model space, sigma (B,), ComfyUI conditioning
    kwargs of ``BaseModel.apply_model`` (c_crossattn (B, tokens, width), y (B, adm) for SDXL, ...)."""

    x: torch.Tensor
    sigma: torch.Tensor
    conditioning: dict


def model_conditioning(model, conditioning: list, latent: torch.Tensor) -> dict:
    """ComfyUI CONDITIONING (its first entry: [cross_attn (1, tokens, width), {"pooled_output": ..., ...}]) as
    ``apply_model`` keyword tensors for ``latent`` (B, C, H, W), built as the samplers build them
    (``BaseModel.extra_conds``: SDXL's y from the pooled output and the image size), repeated to batch B."""
    cross_attn, extras = conditioning[0]
    conds = model.model.extra_conds(input_x=latent, device=latent.device, cross_attn=cross_attn, **extras)
    return {name: cond.process_cond(batch_size=latent.shape[0], device=latent.device).cond for name, cond in conds.items()}


def timestep_count(model) -> int:
    """How many discrete timesteps the model's noise schedule has (DDPM eps models: 1000); training draws t uniformly
    below it, as the LoRAs' own training did. Read from ComfyUI's model_sampling, whose ``sigmas`` hold one entry per
    timestep, so the number is the model's own and lives nowhere else."""
    return len(model.get_model_object("model_sampling").sigmas)


def noised_batch(model, latent: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> NoisedBatch:
    """latent (B, C, H, W) as the VAE gives it, noised at integer ``timestep`` (B,) the way ComfyUI's own
    model sampling does (DDPM's add_noise for eps models); the same batch then serves a branch and its target."""
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma(timestep.float())
    latent = model.model.latent_format.process_in(latent)
    return NoisedBatch(sampling.noise_scaling(sigma, noise, latent), sigma, conditioning)


def prediction(model, batch: NoisedBatch) -> torch.Tensor:
    """The model's noise prediction through ComfyUI's ``apply_model`` (its input scaling, dtype casting and
    conditioning): (x - denoised) / sigma, which is the UNet's eps output for eps models."""
    device = model.load_device
    x, sigma = batch.x.to(device), batch.sigma.to(device)
    denoised = model.model.apply_model(x, sigma, **batch.conditioning)
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.dim() - 1)))


@contextlib.contextmanager
def loaded(patched) -> Iterator[None]:
    """``patched`` loaded the way sampling loads it (object patches applied), unloaded afterwards so the
    modules' own forwards come back."""
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    try:
        yield
    finally:
        comfy.model_management.unload_all_models()
