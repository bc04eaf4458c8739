"""Running ComfyUI's own model for a data-driven merge: the host side of hypernet/calibration.py.

:class:`ReferenceCalibration` draws from reference images (VAE-encoded) and prompts (CLIP-encoded) per side, as the
ZipLoRA node takes them: each draw a reference latent noised at a random timestep with its side's conditioning, the
prediction ComfyUI's ``apply_model`` gives, the branch injected by the one injector (branch.py).

:class:`PromptCalibration` draws each side's first sampling step from an empty latent with its own conditioning, as
the stock KSampler takes it (denoise 1, CFG 1: the conditional pass alone), for SSR-Merge's calibration: the same
noise from the seed, the model's own sigma_max and noise scaling, the conditioning through the model's extra_conds.
What a method learns from it is kept in :data:`CALIBRATIONS`, keyed by everything the run read.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, TypeVar

import comfy.model_management
import comfy.utils
import torch

from ...hypernet.cache import BoundedCache
from ...hypernet.errors import LoraRarError
from ...hypernet.layers import SIDES
from ...hypernet.runtime import RuntimeBranch
from .branch import inject
from .fingerprints import conditioning_settings, conditioning_tensors, hash_tensors, model_fingerprint
from .sampling import (NoisedBatch, loaded, model_conditioning, noised_batch, prediction, throw_if_cancelled,
                       timestep_count)

T = TypeVar("T")

CALIBRATION_SEED = 42  # every calibration step's noise (SSR-Merge's official code seeds each LoRA's step with 42)

# What calibrations learned (SSR-Merge: every layer's R x R statistics). Two entries: the merge node's and a Compare
# grid's column of the same pair stay apart from the next pair; ComfyUI's cache still bounds the models themselves.
CALIBRATIONS: BoundedCache = BoundedCache(
    2, "files' sha256, conditionings' hashes, seed, size, the loaded model (by identity), its patches and forward changes")


def _injected(model, branch: RuntimeBranch, paths: dict[str, str], what: str):
    """``model`` with ``branch`` injected (branch.py); a layer it cannot run refused in one line, ``what`` formatted
    with how many (e.g. "ZipLoRA: {} layers of a + b")."""
    patched, _, skipped = inject(model, branch, paths)
    if skipped:
        name, why = next(iter(skipped.items()))
        raise LoraRarError(f"{what.format(len(skipped))} cannot run in this model's forward (e.g. {name}: {why})")
    return patched


class _Run:
    """The patched, loaded model of one ``running`` block (hypernet.calibration.CalibrationRun)."""

    def __init__(self, patched, data: dict[str, tuple]):
        self.patched, self.data = patched, data

    def draw(self, side: str, generator: torch.Generator, pixels: int | None = None):
        """A reference latent of ``side``, its noise and timestep drawn from ``generator`` (on the CPU, so a seed gives
        the same draws on every device)."""
        latents, conditioning = self.data[side]
        device = self.patched.load_device
        latent = latents[torch.randint(len(latents), (1,), generator=generator)]
        noise = torch.randn(latent.shape, generator=generator)
        timestep = torch.randint(0, timestep_count(self.patched), (1,), generator=generator)
        latent = latent.to(device)
        return noised_batch(self.patched, latent, noise.to(device), timestep.to(device),
                            model_conditioning(self.patched, conditioning, latent))

    def predict(self, batch) -> torch.Tensor:
        return prediction(self.patched, batch)


class ReferenceCalibration:
    """hypernet.calibration.Calibration on reference images and prompts through ComfyUI's model.

    model: a MODEL whose weights autograd may use (sampling.trainable); data: side -> (latents (B, C, h, w),
    CONDITIONING), ordinary tensors (not made under inference mode); paths: layer name -> module path
    (ModelView.module_paths); files: the LoRAs, as errors name them.
    """

    references = True

    def __init__(self, model, data: dict[str, tuple], seed: int, paths: dict[str, str], files: str):
        self.model, self.data, self.seed, self.paths, self.files = model, data, seed, paths, files
        counts = " and ".join(f"{len(data[side][0])} {side}" for side in SIDES)
        self.describe = f"{counts} reference images"

    @contextlib.contextmanager
    def running(self, branch: RuntimeBranch) -> Iterator[_Run]:
        patched = _injected(self.model, branch, self.paths, f"ZipLoRA: {{}} layers of {self.files}")
        with loaded(patched):  # the draws too: the model's noise schedule is on its device once loaded
            yield _Run(patched, self.data)

    def reuse(self, what: tuple, make: Callable[[], T]) -> T:
        return make()  # the ZipLoRA node keeps its whole result (ziplora.RESULTS)


# Pixels a latent pixel of the formats whose stock empty-latent node does not divide by 8 (EmptyFlux2LatentImage,
# Wan22ImageToVideoLatent: 16), for hosts whose latent formats do not say it (0.3.75 has no spacial_downscale_ratio)
_DOWNSCALE = {"Flux2": 16, "Wan22": 16}


def latent_shape(model, pixels: int) -> tuple[int, ...]:
    """An empty latent of ``pixels`` a side in the model's latent format (one frame for video models), as the stock
    empty-latent nodes make it."""
    latent_format = model.model.latent_format
    ratio = getattr(latent_format, "spacial_downscale_ratio", None) or _DOWNSCALE.get(type(latent_format).__name__, 8)
    side = max(1, pixels // ratio)
    frames = (1,) * (getattr(latent_format, "latent_dimensions", 2) - 2)
    return (1, latent_format.latent_channels, *frames, side, side)


class _FirstStep:
    """The patched, loaded model of one PromptCalibration block: each draw the first sampling step of a side."""

    def __init__(self, patched, calibration: "PromptCalibration"):
        self.patched, self.calibration = patched, calibration
        self.bar = comfy.utils.ProgressBar(len(SIDES))
        self.done, self.pixels, self.side = 0, 1024, ""

    def draw(self, side: str, generator: torch.Generator, pixels: int | None = None) -> NoisedBatch:
        """KSampler's first model call on an empty latent of ``pixels`` a side (denoise 1): noise from ``generator``
        scaled at the model's sigma_max the way the sampler scales it, ``side``'s conditioning as the sampler
        converts it."""
        model, device = self.patched, self.patched.load_device
        self.pixels, self.side = pixels or 1024, side
        latent = torch.zeros(latent_shape(model, self.pixels))
        noise = torch.randn(latent.shape, generator=generator)  # comfy.sample.prepare_noise's draw for this seed
        sampling = model.get_model_object("model_sampling")
        sigma = torch.tensor([float(sampling.sigma_max)])
        clean = model.model.latent_format.process_in(latent)
        x = sampling.noise_scaling(sigma, noise, clean, max_denoise=True)
        with self._model_step():
            conditioning = model_conditioning(model, self.calibration.conditioning[side], clean.to(device))
        return NoisedBatch(x, sigma, conditioning, clean)

    def predict(self, batch: NoisedBatch) -> torch.Tensor:
        throw_if_cancelled()
        with self._model_step():
            out = prediction(self.patched, batch)
        self.done += 1
        self.bar.update_absolute(self.done, len(SIDES))
        return out


    @contextlib.contextmanager
    def _model_step(self) -> Iterator[None]:
        """The model's own checks (a conditioning's width or extras, a size it has no table for) in one line."""
        try:
            yield
        except (LoraRarError, comfy.model_management.InterruptProcessingException):
            raise
        except Exception as error:  # noqa: BLE001  (whatever the model raises: one line naming the side and the size)
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise LoraRarError(f"calibration: the model's step on the {self.side} LoRA's conditioning at {self.pixels} px "
                               f"failed ({type(error).__name__}: {reason}): a conditioning from another model's text "
                               "encoder, or a size this model does not sample (calibration_px)") from error


class PromptCalibration:
    """hypernet.calibration.Calibration on each side's conditioning alone: one first sampling step per LoRA.

    model: the MODEL the merge is for; conditioning: side -> CONDITIONING (each LoRA's own prompt, encoded); paths:
    layer name -> module path (ModelView.module_paths); files: the two LoRA files, as errors name them, and their
    sha256 (with the rest of what the run reads: ``key``).
    """

    references = False

    def __init__(self, model, conditioning: dict[str, list], paths: dict[str, str], files: tuple[str, str],
                 file_hashes: tuple[str, str], seed: int = CALIBRATION_SEED):
        self.model, self.conditioning, self.seed, self.paths = model, conditioning, seed, paths
        self.files = " + ".join(files)
        self.describe = f"one sampling step per LoRA on its conditioning, seed {seed}"
        self.key = (*file_hashes, seed, model_fingerprint(model),
                    *(hash_tensors(*conditioning_tensors(conditioning[side])) for side in SIDES),
                    *(conditioning_settings(conditioning[side]) for side in SIDES))
        self.seconds: float | None = None  # the run's time, when this calibration ran the model (None: reused)

    @contextlib.contextmanager
    def running(self, branch: RuntimeBranch) -> Iterator[_FirstStep]:
        patched = _injected(self.model, branch, self.paths, f"calibration: {{}} layers of {self.files}")
        started = time.perf_counter()
        with loaded(patched):
            yield _FirstStep(patched, self)
        self.seconds = time.perf_counter() - started

    def reuse(self, what: tuple, make: Callable[[], T]) -> T:
        result, _ = CALIBRATIONS.get_or_make((self.key, what), make, (self.model.model,))
        return result
