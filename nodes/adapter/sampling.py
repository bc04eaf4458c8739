"""The model side of every loop that runs ComfyUI's model outside its samplers (ZipLoRA's optimisation, training):
conditioning as ``apply_model`` arguments, noising, the prediction and its training target for every prediction
type the host has, loading and unloading only the model in use; and the stock nodes' encode / sample / decode.

Prediction types: the prediction is (x - denoised) / sigma, with ``denoised`` from ComfyUI's own
``apply_model`` (its model_sampling's calculate_denoised): eps models give their eps, v models the eps their v
implies, flow (CONST) models their velocity. Its target is (x - clean latent) / sigma for the same x, which is
the noise for eps and v models and noise - latent for flow models: one formula, whatever the type, because the
noising is ComfyUI's own ``noise_scaling`` of the same model_sampling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import comfy.model_management
import nodes as comfy_nodes  # ComfyUI's own nodes.py (the pack's package is imported relatively)
import numpy as np
import torch
from PIL import Image

from ...hypernet.cache import BoundedCache
from ...hypernet.errors import LoraRarError


@dataclass
class NoisedBatch:
    """One branch input: x (B, C, H, W) noised latents in model space, sigma (B,), ComfyUI conditioning kwargs of
    ``BaseModel.apply_model`` (c_crossattn (B, tokens, width), y (B, adm) for SDXL, ...), and the clean latent
    (model space) x was noised from."""

    x: torch.Tensor
    sigma: torch.Tensor
    conditioning: dict
    clean: torch.Tensor | None = None


def model_conditioning(model, conditioning: list, latent: torch.Tensor) -> dict:
    """ComfyUI CONDITIONING (its first entry: [cross_attn (1, tokens, width), {"pooled_output": ..., ...}]) as
    ``apply_model`` keyword tensors for ``latent`` (B, C, H, W), built as the samplers build them
    (``BaseModel.extra_conds``: SDXL's y from the pooled output and the image size), repeated to batch B. The
    keywords are those of the samplers' ``encode_model_conds``: the image size from the latent (8 pixels per latent
    pixel, as the sampler assumes) unless the conditioning says it, the noise's shape, the positive prompt type."""
    cross_attn, extras = conditioning[0]
    size = {"width": latent.shape[-1] * 8, "height": latent.shape[-2] * 8, "prompt_type": "positive"}
    conds = model.model.extra_conds(input_x=latent, noise=latent, device=latent.device, cross_attn=cross_attn,
                                    **{**size, **extras})
    return {name: cond.process_cond(batch_size=latent.shape[0], device=latent.device).cond for name, cond in conds.items()}


def timestep_count(model) -> int:
    """How many discrete timesteps the model's own sampling has (SD-family DDPM: 1000)."""
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    return int(len(sigmas)) if sigmas is not None else 1000


def noised_batch(model, latent: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> NoisedBatch:
    """latent (B, C, H, W) as the VAE gives it, noised at integer ``timestep`` (B,) the way ComfyUI's own model
    sampling does (its noise_scaling: DDPM's add_noise for eps models, the interpolation for flow models); the same
    batch then serves a branch and its target. The timestep indexes the model's own schedule (``sigmas``, what
    :func:`timestep_count` counts): its ``sigma(t)`` takes t in the sampling's own units, which are not indices for
    every model (Flux's takes t in [0, 1], so index 5000 of its 10000 gave sigma 1, pure noise, at every draw)."""
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    sigma = sigmas[timestep.long().to(sigmas.device)].float() if sigmas is not None else sampling.sigma(timestep.float())
    latent = model.model.latent_format.process_in(latent)
    return NoisedBatch(sampling.noise_scaling(sigma, noise, latent), sigma, conditioning, latent)


def _per_row(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))


def prediction(model, batch: NoisedBatch) -> torch.Tensor:
    """The model's prediction through ComfyUI's ``apply_model`` (its input scaling, dtype casting and
    conditioning) as (x - denoised) / sigma: the UNet's eps output for eps models (module docstring)."""
    device = model.load_device
    x, sigma = batch.x.to(device), batch.sigma.to(device)
    denoised = model.model.apply_model(x, sigma, **batch.conditioning)
    return (x - denoised) / _per_row(sigma, x)


def target(model, batch: NoisedBatch) -> torch.Tensor:
    """What :func:`prediction` should be for ``batch``: (x - clean) / sigma (module docstring)."""
    device = model.load_device
    x, sigma = batch.x.to(device), batch.sigma.to(device)
    return (x - batch.clean.to(device)) / _per_row(sigma, x)


@contextlib.contextmanager
def loaded(patched) -> Iterator[None]:
    """``patched`` loaded the way sampling loads it (object patches applied), and afterwards unloaded, only it,
    so the modules' own forwards come back and the other models ComfyUI keeps stay where they are."""
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    try:
        yield
    finally:
        _unload(patched)


def _unload(patched) -> None:
    """ComfyUI's own free_memory, told to keep every loaded model but ``patched`` (both hosts have keep_loaded)."""
    others = [entry for entry in comfy.model_management.current_loaded_models if entry.model is not patched]
    comfy.model_management.free_memory(1e30, patched.load_device, keep_loaded=others)


def trainable(model):
    """``model`` as autograd can use it. ComfyUI runs every node under torch.inference_mode, so the weights its loader
    made are inference tensors, which autograd refuses to save for backward. Each such weight is replaced by an
    ordinary copy of itself (same values, one tensor at a time, so memory peaks at one extra weight), after the
    models are unloaded so no patched weight is mistaken for the original. The model object stays the one every
    node shares; a later run finds ordinary tensors and copies nothing. (ComfyUI 0.33's own training node instead
    reloads the whole model, clone(force_deepcopy), which 0.3.75 lacks; a deepcopy of the module fails on 0.33.)"""
    stores = [store for module in model.model.modules() for store in (module._parameters, module._buffers)]
    if not any(t is not None and t.is_inference() for store in stores for t in store.values()):
        return model
    comfy.model_management.unload_all_models()
    for store in stores:
        for name, tensor in store.items():
            if tensor is not None and tensor.is_inference():
                copied = tensor.clone()
                store[name] = torch.nn.Parameter(copied, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else copied
    return model


# ---- the stock nodes: encode, sample, decode --------------------------------------------------------------------

def encode_text(clip, text: str) -> list:
    """CONDITIONING of ``text``, as the stock CLIPTextEncode node makes it."""
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def _same_weights(clip):
    """An encoding entry's match for ``clip``: ComfyUI's own test (same model, same patches, hooks and wrappers)."""
    return lambda key, objects: objects[0] is not None and objects[0].clone_has_same_weights(clip.patcher)


# The prompts' conditioning per text encoder: a column whose CLIP has the same weights as one encoded before reuses
# that encoding (the LoRAs without text-encoder layers, the baselines, the previous run while the same CLIP stays
# connected); every other column encodes with its own patched CLIP. A few entries, holding the CLIPs weakly.
ENCODINGS: BoundedCache = BoundedCache(4, "prompts, CLIP layer and tokenizer options; CLIP patcher by same weights")


def encode_prompts(clip, positive: str, negative: str, connected=None) -> tuple:
    """(positive, negative) conditioning of ``clip``; ``connected``: the node's CLIP input, which outlives the
    columns' clones, so an encoding stored under it is found again by the next column and the next run."""
    if connected is not None and connected.patcher.clone_has_same_weights(clip.patcher):
        clip = connected
    texts = (positive, negative, getattr(clip, "layer_idx", None), repr(getattr(clip, "tokenizer_options", None)))
    same = _same_weights(clip)
    found = ENCODINGS.find(lambda key, objects: key[0] == texts and same(key, objects))
    if found is not None:
        return found
    encoded = encode_text(clip, positive)
    conditioning = (encoded, encoded if negative == positive else encode_text(clip, negative))
    return ENCODINGS.put((texts, id(clip.patcher)), conditioning, (clip.patcher,))


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> latents (B, C, h, w) float32, as the stock VAEEncode node gives them."""
    return comfy_nodes.VAEEncode().encode(vae, images[..., :3])[0]["samples"].float()


def sample_and_decode(model, vae, conditioning: tuple, latent_image: dict, seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """IMAGE of one stock KSampler run on (positive, negative) ``conditioning``, decoded by the stock VAEDecode."""
    (latent,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, *conditioning,
                                            latent_image, denoise=denoise)
    return comfy_nodes.VAEDecode().decode(vae, latent)[0]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) floats in [0, 1] -> B RGB PIL images."""
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    pixels = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(frame, "RGB") for frame in pixels]


def to_image(picture: Image.Image) -> torch.Tensor:
    """One RGB PIL image -> ComfyUI IMAGE (1, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def throw_if_cancelled() -> None:
    """ComfyUI's Cancel: raises its interrupt exception when the user pressed it."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def check_images(images: torch.Tensor, what: str, smallest: int) -> None:
    """One-line refusals of an IMAGE input a loop cannot use: empty, under ``smallest`` px a side, not finite."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise LoraRarError(f"{what} must be an IMAGE batch of at least one image")
    height, width = images.shape[1:3]
    if min(height, width) < smallest:
        raise LoraRarError(f"{what} are {width}x{height} px; each side must be at least {smallest} px "
                           "(the VAE encodes 8 px blocks): use larger reference images")
    if not bool(torch.isfinite(images).all()):
        raise LoraRarError(f"{what} hold NaN or Inf pixel values: fix the node that made them")
