"""ZipLoRA through ComfyUI's own model (arXiv 2311.13600): the merge coefficients of one subject/style LoRA pair
optimised on reference images, for pairs the published hypernetwork does not serve.

The objective, the factored branch and the conversion to a merged LoRA are hypernet/ziplora.py; the branch rides
on the model through the one injector (branch.py). This module prepares the data (images VAE-encoded, prompts
CLIP-encoded), runs the optimisation (hypernet.ziplora.optimise) through ComfyUI's model (calibration.py) with
ComfyUI's progress bar and Cancel, caches the result by its inputs, and applies it through the merge's own patching
(model.py's apply_merged, fit.py's verdict), so its outputs are those of every other merge. Its settings' defaults are the registered method's
parameters (hypernet/methods/zip_lora.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import comfy.utils
import torch

from ...hypernet.cache import BoundedCache
from ...hypernet.errors import LoraRarError
from ...hypernet.files import file_sha256
from ...hypernet.loss_curve import loss_curve
from ...hypernet.result import MergedLora
from ...hypernet.ziplora import ZipLoraMerge, optimise, to_merged_lora
from .calibration import ReferenceCalibration
from .fingerprints import conditioning_settings, conditioning_tensors, hash_tensors, model_fingerprint
from .model import ModelView, apply_merged, diffusion_layers, lora_path, refuse_unsupported
from .sampling import check_images, encode_images, encode_prompts, throw_if_cancelled, to_image, trainable
# The smallest reference image side: the VAE needs whole 8 px blocks and the diffusion model's downsampling a few
# latent pixels; 64 px (8 x 8 latents) is the smallest this pack tests, and smaller references teach nothing anyway.
MIN_IMAGE_PX = 64

# The last result: a re-run where only the sampling changed reuses it. One entry: ComfyUI's cache bounds memory.
RESULTS: BoundedCache = BoundedCache(
    1, "files' sha256, settings, the loaded model (by identity), its patches and forward changes, latents' and conditionings' hashes")


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


def _reference(vae, clip, images: torch.Tensor, prompt: str, what: str) -> tuple:
    """(latents (B, C, h, w), CONDITIONING) of one side's reference images and prompt."""
    check_images(images, f"ZipLoRA: {what}", MIN_IMAGE_PX)
    return encode_images(vae, images), encode_prompts(clip, prompt, prompt)[0]  # the next run reuses the encoding


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


def _optimise(model, subject_path, style_path, subject_data, style_data, settings: Settings, node_id) -> _Result:
    """The optimisation: AdamW on the coefficients only, one subject and one style example per step."""
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        subject_data, style_data = _ordinary(subject_data), _ordinary(style_data)
        return _optimise_trainable(trainable(model), subject_path, style_path, subject_data, style_data, settings,
                                   node_id)


def _ordinary(data: tuple) -> tuple:
    """(latents, CONDITIONING) made under inference mode, as ordinary tensors (clones) autograd may save."""
    latents, conditioning = data
    return latents.clone(), [[cross_attn.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                   for k, v in extras.items()}] for cross_attn, extras in conditioning]


def _optimise_trainable(model, subject_path, style_path, subject_data, style_data, settings: Settings, node_id) -> _Result:
    view = ModelView(model)
    subject, style = view.read_pair(subject_path, style_path)
    paths = view.module_paths()
    for lora in (subject, style):
        refuse_unsupported(lora, paths, "ZipLoRA")
    merge = ZipLoraMerge(diffusion_layers(subject, paths), diffusion_layers(style, paths))
    if not merge.coefficient_parameters():
        raise LoraRarError(f"ZipLoRA: {subject.path} and {style.path} share no diffusion-model layer, so there is "
                           "nothing to optimise (the merge is their plain sum: use the merge node's direct method)")
    calibration = ReferenceCalibration(model, {"subject": subject_data, "style": style_data}, settings.seed, paths,
                                       f"{subject.path} + {style.path}")
    started = time.perf_counter()
    with calibration.running(merge) as run:
        done = optimise(merge, run, settings.steps, settings.learning_rate, settings.similarity_lambda,
                        settings.stop_similarity, settings.seed, before_step=throw_if_cancelled,
                        after_step=_Progress(settings.steps, node_id))
    merged = to_merged_lora(merge, subject, style, params=settings.as_params())
    layers = len(merge.coefficient_parameters()) // 2
    return _Result(merged, done.history, done.start, done.end, time.perf_counter() - started, done.early_stop, layers)


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


def optimise_for_model(model, clip, vae, subject_lora: str, style_lora: str, subject_reference: tuple,
                       style_reference: tuple, settings: Settings, node_id: str | None) -> tuple:
    """(MODEL, CLIP, merged LoRA as applied, report, loss curve IMAGE); ``*_reference``: (IMAGE, prompt)."""
    subject_path, style_path = lora_path(subject_lora), lora_path(style_lora)
    subject_data = _reference(vae, clip, *subject_reference, "subject_images")
    style_data = _reference(vae, clip, *style_reference, "style_images")
    key = (file_sha256(subject_path), file_sha256(style_path), settings, model_fingerprint(model),
           *(hash_tensors(latents, *conditioning_tensors(cond)) for latents, cond in (subject_data, style_data)),
           *(conditioning_settings(cond) for _, cond in (subject_data, style_data)))
    result, reused = RESULTS.get_or_make(key, lambda: _optimise(model, subject_path, style_path, subject_data,
                                                                 style_data, settings, node_id), (model.model,))
    merged = result.merged.named(subject_lora, style_lora, subject_path, style_path)
    model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
    curve = to_image(loss_curve(result.history, f"ZipLoRA: {subject_lora} + {style_lora}"))
    return model_out, clip_out, applied, _report(result, settings, reused, applied_text), curve
