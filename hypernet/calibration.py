"""Running the model while merging: what a data-driven method (``MergeMethod.needs_model``) gets from the host.

Static methods merge from the two LoRAs' factors alone; a data-driven one runs the base model with a runtime branch
in its layers before it merges: ZipLoRA optimises its column coefficients on reference images and prompts of both
sides, SSR-Merge takes one calibration step per LoRA and merges from what the layers saw. Both need the
same two things from the host, and nothing else of it: the model with a :class:`~hypernet.runtime.RuntimeBranch`
injected and loaded, and model inputs drawn from each side's data. The host implements :class:`Calibration`
(ComfyUI's: ``nodes/adapter/calibration.py``); the merge passes it to the method as ``MergeContext.calibration``.
Torch only, like the rest of ``hypernet/``. The merge runs under ``torch.no_grad``; a method that needs gradients
(ZipLoRA) enables them itself, and a host that runs under ``torch.inference_mode`` (ComfyUI's nodes) leaves it and
hands over ordinary tensors before it merges.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

import torch

if TYPE_CHECKING:  # named in a signature only: a Protocol of the host's side holds no runtime branch itself
    from .runtime import RuntimeBranch

T = TypeVar("T")


class CalibrationRun(Protocol):
    """The model, loaded with a branch injected, for the time of one ``Calibration.running`` block."""

    def draw(self, side: str, generator: torch.Generator, pixels: int | None = None) -> object:
        """One model input from ``side``'s data ("subject" or "style"): a latent noised at a timestep, with its
        conditioning, in the host's own type; every random choice from ``generator`` (on the CPU, so a seed gives
        the same draws on every device). ``pixels``: the image side where the host makes the latent itself (a
        calibration pass from an empty latent; None: the host's default, 1024); draws from reference images have
        their size and ignore it. A calibration pass draws and predicts once per side: the host's progress counts
        that, and it checks Cancel before each ``predict``."""

    def predict(self, batch: object) -> torch.Tensor:
        """The model's prediction for a drawn input, through the injected branch as it routes now (with autograd
        when the caller enables it: ZipLoRA's coefficients get gradients)."""


class Calibration(Protocol):
    """The model a data-driven merge runs through and the data it runs on, supplied by the host."""

    # what the draws come from, in one line for reports and errors (e.g. "2 subject and 1 style reference images")
    describe: str
    # True when each side has its own reference images and prompts (ZipLoRA's data); False when the draws come from
    # the model and prompts alone (a calibration pass)
    references: bool
    # seeds every draw (the ZipLoRA node's seed input; the host's fixed calibration seed, 42, for a calibration pass),
    # so a calibration repeats exactly on the CPU
    seed: int

    def running(self, branch: RuntimeBranch) -> AbstractContextManager[CalibrationRun]:
        """Inject ``branch`` into the model's layers and load the model for the block; refuses (LoraRarError, one
        line) a branch layer the model cannot run."""

    def reuse(self, what: tuple, make: Callable[[], T]) -> T:
        """What ``make`` learns from this calibration, kept by the host under its inputs (the LoRA files, the data,
        the seed, the model) and ``what`` (the method's own part: e.g. the layer names): a rerun that changes only
        strengths or a method parameter the statistics do not depend on reuses it. A failed ``make`` keeps nothing."""
