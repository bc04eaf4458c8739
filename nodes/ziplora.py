"""ZipLoRA node: the merge coefficients of one subject/style LoRA pair optimised through ComfyUI's own model
(ZipLoRA, arXiv 2311.13600), for pairs the published hypernetwork does not serve.

The objective, the factored branch and the conversion to a merged LoRA are hypernet/ziplora.py; how the branch
rides on ComfyUI's model (object patches) is nodes/ziplora_patch.py. This node prepares the data (images
VAE-encoded, prompts CLIP-encoded), runs the optimisation loop with ComfyUI's progress bar and interrupt, and
applies the result through the merge node's own patching, so its outputs are those of every other merge.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import comfy.model_management
import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's own nodes.py (the pack's package is imported relatively)
import torch

from ..hypernet.errors import LoraRarError, unforeseen_as_error
from ..hypernet.loss_curve import loss_curve
from ..hypernet.merge import MergedLora
from ..hypernet.ziplora import DEFAULT_LAMBDA, ZipLoraMerge, optimisation_step, to_merged_lora, ziplora_loss
from .common import CATEGORY, MERGED_TYPE, fingerprint, model_layout
from .evaluate import to_image
from .merge import LoraRarMerge, model_key_map, model_weights, read_for_model, apply_merged
from .ziplora_patch import (diffusion_layers, inject, loaded, model_conditioning, module_paths, noised_batch, prediction,
                            timestep_count, unsupported_layers)

DEFAULT_LEARNING_RATE = 0.01  # LoRA.rar's ZipLoRA baseline (../shared/METHOD.md); the paper gives none
# Early stop: the published rule is "until the cosine reaches 0", but |cos| of two float32 vectors only reaches
# exactly 0 by chance, so the default stops once the mean |cos| per layer is below 1e-3 (the columns' weight
# vectors within 0.06 degrees of orthogonal): further steps can no longer lower lambda * sum|cos| measurably.
DEFAULT_STOP_SIMILARITY = 1e-3
# The smallest reference image side: the VAE needs whole 8 px blocks and the diffusion model's downsampling a few
# latent pixels; 64 px (8 x 8 latents) is the smallest this pack tests, and smaller references teach nothing anyway.
MIN_IMAGE_PX = 64

# The last result, keyed by what decides it (files' sha256, latents' and conditionings' hashes, settings, the
# model's weights): a re-run where only the sampling changed reuses it. One entry: ComfyUI's cache bounds memory.
_RESULTS: "OrderedDict[tuple, _Result]" = OrderedDict()
_RESULTS_MAX = 1


@dataclass(frozen=True)
class Settings:
    steps: int
    learning_rate: float
    similarity_lambda: float
    seed: int
    stop_similarity: float

    def as_params(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.__dict__.items()}


@dataclass
class _Result:
    merged: MergedLora
    history: list[dict[str, float]]
    start: dict[str, float]
    end: dict[str, float]
    seconds: float
    early_stop: bool
    layers: int
    lines: list[str] = field(default_factory=list)


def _hash_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _conditioning_tensors(conditioning: list) -> list[torch.Tensor]:
    """The tensors of a ComfyUI CONDITIONING (cross attention and the extras, e.g. the pooled output)."""
    return [t for cross_attn, extras in conditioning
            for t in (cross_attn, *(v for _, v in sorted(extras.items()) if isinstance(v, torch.Tensor)))]


def _model_fingerprint(model) -> str:
    """The model's weights, sampled (16 values spread over each tensor, every shape and dtype), and the patches
    already on it: telling two checkpoints apart without reading gigabytes on every run."""
    digest = hashlib.sha256(type(model.model.model_config).__name__.encode())
    for name, weight in model.model.state_dict().items():
        flat = weight.detach().reshape(-1)
        count = min(16, flat.numel())
        sample = flat[torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)]  # integer: exact for any size
        digest.update(f"{name}|{tuple(weight.shape)}|{weight.dtype}|".encode())
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    if model.patches:  # a LoRA loaded upstream changes what the merge is optimised on
        digest.update(f"{sorted(model.patches)}|{model.patches_uuid}".encode())
    return digest.hexdigest()


def _encode_images(vae, images: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> latents (B, C, h, w) as VAEEncode gives them (cropped to the VAE's multiple)."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise LoraRarError(f"ZipLoRA: {what} must be an IMAGE batch of at least one image")
    height, width = images.shape[1:3]
    if min(height, width) < MIN_IMAGE_PX:
        raise LoraRarError(f"ZipLoRA: {what} are {width}x{height} px; each side must be at least {MIN_IMAGE_PX} px "
                           "(the VAE encodes 8 px blocks): use larger reference images")
    if not bool(torch.isfinite(images).all()):
        raise LoraRarError(f"ZipLoRA: {what} hold NaN or Inf pixel values: fix the node that made them")
    return comfy_nodes.VAEEncode().encode(vae, images[..., :3])[0]["samples"].float()


def _read_pair(model, subject_path: str, style_path: str):
    """(subject, style) LoraFiles as this model's key map reads them (diffusion model only)."""
    key_map = model_key_map(model, None)
    shapes = {key: tuple(weight.shape) for key, weight in model_weights(model, None).items()}
    with unforeseen_as_error(f"{subject_path} + {style_path}"):
        return tuple(read_for_model(path, key_map, shapes, model_layout(model), False) for path in (subject_path, style_path))


def _draw(model, latents: torch.Tensor, conditioning: list, generator: torch.Generator):
    """One training example: a reference latent, its noise and timestep drawn from ``generator`` (on the CPU, so a
    seed gives the same draws on every device); the merged branch and its target both run on this batch."""
    device = model.load_device
    latent = latents[torch.randint(len(latents), (1,), generator=generator)]
    noise = torch.randn(latent.shape, generator=generator)
    timestep = torch.randint(0, timestep_count(model), (1,), generator=generator)
    latent = latent.to(device)
    return noised_batch(model, latent, noise.to(device), timestep.to(device),
                        model_conditioning(model, conditioning, latent))


class _Progress:
    """ComfyUI's progress bar per step, and the loss as the node's progress text where a server runs."""

    def __init__(self, steps: int, node_id: str | None):
        self.bar, self.node_id = comfy.utils.ProgressBar(steps, node_id=node_id), node_id
        try:
            from server import PromptServer
            self.server = getattr(PromptServer, "instance", None)
        except ImportError:
            self.server = None

    def __call__(self, step: int, steps: int, loss: dict[str, float]) -> None:
        self.bar.update_absolute(step, steps)
        if self.server is not None and self.node_id is not None:
            self.server.send_progress_text(f"ZipLoRA step {step}/{steps}: loss {loss['total']:.5g} (subject "
                                           f"{loss['subject']:.3g}, style {loss['style']:.3g}, sum|cos| "
                                           f"{loss['similarity']:.3g})", self.node_id)


def _trainable(model):
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


def _optimise(model, subject_path, style_path, subject_data, style_data, settings: Settings, node_id) -> _Result:
    """The optimisation: AdamW on the coefficients only, one subject and one style example per step."""
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        subject_data, style_data = _ordinary(subject_data), _ordinary(style_data)
        return _optimise_trainable(_trainable(model), subject_path, style_path, subject_data, style_data, settings,
                                   node_id)


def _ordinary(data: tuple) -> tuple:
    """(latents, CONDITIONING) made under inference mode, as ordinary tensors (clones) autograd may save."""
    latents, conditioning = data
    return latents.clone(), [[cross_attn.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                   for k, v in extras.items()}] for cross_attn, extras in conditioning]


def _optimise_trainable(model, subject_path, style_path, subject_data, style_data, settings: Settings, node_id) -> _Result:
    subject, style = _read_pair(model, subject_path, style_path)
    paths = module_paths(model)
    for lora in (subject, style):
        unsupported = unsupported_layers(lora, paths)
        if unsupported:
            name, kind = next(iter(unsupported.items()))
            raise LoraRarError(f"ZipLoRA: {lora.path} has {len(unsupported)} diffusion-model layers the optimisation "
                               f"cannot run (e.g. {name}: {kind}); it optimises plain LoRA layers (linear or 1x1 conv) "
                               "only: use the merge node for this file")
    merge = ZipLoraMerge(diffusion_layers(subject, paths), diffusion_layers(style, paths))
    if not merge.coefficient_parameters():
        raise LoraRarError(f"ZipLoRA: {subject.path} and {style.path} share no diffusion-model layer, so there is "
                           "nothing to optimise (the merge is their plain sum: use the merge node's direct method)")
    patched = inject(model, merge)
    started = time.perf_counter()
    with loaded(patched):  # the draws too: the model's noise schedule is on its device once loaded
        start, history, end, early = _steps(patched, merge, subject_data, style_data, settings, node_id)
    merged = to_merged_lora(merge, subject, style, params=settings.as_params())
    layers = len(merge.coefficient_parameters()) // 2
    return _Result(merged, history, start, end, time.perf_counter() - started, early, layers)


def _steps(patched, merge: ZipLoraMerge, subject_data, style_data, settings: Settings, node_id) -> tuple:
    """(loss at start, per-step losses, loss at end, stopped early): the start and end losses on one fixed evaluation
    batch, drawn first from the seed, so the two compare; each step on its own draw."""
    parameters = merge.coefficient_parameters()
    # decoupled weight decay off: it would pull the coefficients toward 0, away from the init 1 both targets favour
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)

    def draw():
        return _draw(patched, *subject_data, generator), _draw(patched, *style_data, generator)

    def loss_on(batches):
        return ziplora_loss(merge, lambda batch: prediction(patched, batch), *batches, lam=settings.similarity_lambda)

    evaluation = draw()
    with torch.no_grad():
        start = _finite(loss_on(evaluation).as_floats(), "at start, before any step,")
    progress, history, early = _Progress(settings.steps, node_id), [], False
    for step in range(settings.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        batches = draw()
        history.append(_finite(optimisation_step(merge, optimizer, lambda: loss_on(batches)).as_floats(),
                               f"at step {step + 1}"))
        if not all(bool(torch.isfinite(p).all()) for p in parameters):
            raise LoraRarError(f"ZipLoRA: the coefficients became NaN or Inf at step {step + 1} (the optimisation "
                               f"diverged): lower the learning rate ({settings.learning_rate:g}); nothing was applied")
        progress(step + 1, settings.steps, history[-1])
        early = float(merge.similarity().detach()) <= settings.stop_similarity * (len(parameters) // 2)
        if early:
            break
    with torch.no_grad():
        end = loss_on(evaluation).as_floats()
    return start, history, end, early


def _finite(loss: dict[str, float], when: str) -> dict[str, float]:
    """``loss`` when every term is finite; otherwise the run stops here, before a NaN reaches the coefficients, the
    patched model or a saved file."""
    if all(map(math.isfinite, loss.values())):
        return loss
    raise LoraRarError(f"ZipLoRA: the loss {when} is not finite (total {loss['total']:g}, subject {loss['subject']:g}, "
                       f"style {loss['style']:g}): the LoRAs overflow this model's forward (alpha or strength too "
                       "large for its dtype) or the optimisation diverged (lower the learning rate); nothing was applied")


def _report(result: _Result, settings: Settings, reused: bool, applied_text: str) -> str:
    def terms(loss):
        return (f"total {loss['total']:.6g} = subject {loss['subject']:.6g} + style {loss['style']:.6g} + "
                f"{settings.similarity_lambda:g} x sum|cos| {loss['similarity']:.6g}")

    stop = (f"early stop: mean |cos| per layer reached {settings.stop_similarity:g}" if result.early_stop
            else "no early stop (the similarity term stayed above the threshold)")
    return "\n".join([
        f"LoRA.rar ZipLoRA: {result.merged.report.subject} + {result.merged.report.style}",
        f"{len(result.history)} of {settings.steps} steps in {result.seconds:.1f} s, AdamW lr "
        f"{settings.learning_rate:g}, lambda {settings.similarity_lambda:g}, seed {settings.seed}; {stop}",
        f"coefficients: {result.layers} layers both LoRAs patch (each d_in x 2)",
        f"loss on a fixed evaluation batch at start: {terms(result.start)}",
        f"loss on a fixed evaluation batch at end:   {terms(result.end)}",
        *([f"warning: the loss rose from {result.start['total']:.6g} to {result.end['total']:.6g}, so the optimisation "
           f"diverged: lower the learning rate ({settings.learning_rate:g}) and run again"]
          if result.end["total"] > result.start["total"] else []),
        "reused the result of an identical earlier run (same files, images, prompts, settings and model)"
        if reused else "optimised now",
        "text encoders: not part of ZipLoRA's optimisation; the CLIP output carries none of the LoRAs' layers",
        applied_text,
    ])


class LoraRarZipLora:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", MERGED_TYPE, "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "merged_lora", "report", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The model with the optimised merged LoRA applied.",
        "The CLIP through the same patching (ZipLoRA merges the diffusion model's layers only, so none of its weights change).",
        "The optimised merged LoRA (rank r_subject + r_style per layer), for the save node and the coefficient picture.",
        "Loss terms at start and end on a fixed batch, steps run, time, whether it stopped early, layers applied.",
        "The loss and the similarity term per step.",
    )
    FUNCTION = "optimise"
    DESCRIPTION = (
        "ZipLoRA (arXiv 2311.13600): optimises, for one subject LoRA and one style LoRA, a subject and a style "
        "coefficient per input column of every layer both patch, so the merged model reproduces the subject LoRA "
        "on the subject images and the style LoRA on the style images while the two coefficient vectors become "
        "orthogonal. Runs through ComfyUI's own model (minutes per pair on a GPU); for pairs the published "
        "LoRA.rar hypernetwork does not serve. Cancel with ComfyUI's interrupt."
    )

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the merge is optimised through (SDXL family, or any model whose LoRA layers are linear or 1x1 conv)."}),
                "clip": ("CLIP", {"tooltip": "Encodes the two prompts."}),
                "vae": ("VAE", {"tooltip": "Encodes the reference images into latents."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA."}),
                "style_lora": (loras, {"tooltip": "The style LoRA."}),
                "subject_images": ("IMAGE", {"tooltip": "Reference images of the subject (a batch); one is drawn per step."}),
                "subject_prompt": ("STRING", {"multiline": True, "default": "A photo of sks dog",
                                              "tooltip": "The subject LoRA's prompt for its images."}),
                "style_images": ("IMAGE", {"tooltip": "The style image(s); one is drawn per step."}),
                "style_prompt": ("STRING", {"multiline": True, "default": "A painting in watercolor painting style",
                                            "tooltip": "The style LoRA's prompt for its images."}),
                "steps": ("INT", {"default": 100, "min": 1, "max": 10000,
                                  "tooltip": "Optimisation steps (ZipLoRA: at most 100)."}),
                "learning_rate": ("FLOAT", {"default": DEFAULT_LEARNING_RATE, "min": 1e-6, "max": 1.0, "step": 0.0001,
                                            "round": False, "tooltip": "AdamW's learning rate on the coefficients. "
                                            "0.01 as LoRA.rar's ZipLoRA baseline (the paper gives none; the "
                                            "diffusers script's 1e-4 barely moves coefficients that start at 1 in 100 steps)."}),
                "similarity_lambda": ("FLOAT", {"default": DEFAULT_LAMBDA, "min": 0.0, "max": 100.0, "step": 0.001,
                                                "round": False, "tooltip": "lambda: weight of sum |cos(m_subject, m_style)| over the layers (ZipLoRA: 0.01)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seeds the images, noise and timesteps drawn per step (the same for the merged branch and its targets)."}),
                "stop_similarity": ("FLOAT", {"default": DEFAULT_STOP_SIMILARITY, "min": 0.0, "max": 1.0, "step": 0.0001,
                                              "round": False, "tooltip": "Early stop once the mean |cos| per layer is at or below this "
                                              "(ZipLoRA stops when the cosine reaches 0; float cosines hit exactly 0 only by chance). 0: run every step."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        return LoraRarMerge.IS_CHANGED(subject_lora=subject_lora, style_lora=style_lora)

    def optimise(self, model, clip, vae, subject_lora, style_lora, subject_images, subject_prompt, style_images,
                 style_prompt, steps, learning_rate, similarity_lambda, seed, stop_similarity, unique_id=None):
        settings = Settings(int(steps), float(learning_rate), float(similarity_lambda), int(seed), float(stop_similarity))
        subject_path = folder_paths.get_full_path_or_raise("loras", subject_lora)
        style_path = folder_paths.get_full_path_or_raise("loras", style_lora)
        encode = comfy_nodes.CLIPTextEncode().encode
        subject_data = (_encode_images(vae, subject_images, "subject_images"), encode(clip, subject_prompt)[0])
        style_data = (_encode_images(vae, style_images, "style_images"), encode(clip, style_prompt)[0])
        key = (fingerprint(subject_path), fingerprint(style_path), settings, _model_fingerprint(model),
               *(_hash_tensors(latents, *_conditioning_tensors(cond)) for latents, cond in (subject_data, style_data)))
        result = _RESULTS.get(key)
        reused = result is not None
        if result is None:
            result = _optimise(model, subject_path, style_path, subject_data, style_data, settings, unique_id)
        _RESULTS[key] = result
        _RESULTS.move_to_end(key)
        while len(_RESULTS) > _RESULTS_MAX:
            _RESULTS.popitem(last=False)
        merged = result.merged.named(subject_lora, style_lora, subject_path, style_path)
        model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
        curve = to_image(loss_curve(result.history, f"ZipLoRA: {subject_lora} + {style_lora}"))
        return (model_out, clip_out, applied, _report(result, settings, reused, applied_text), curve)
