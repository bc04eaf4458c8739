"""Running ComfyUI's own model for a data-driven merge: the host side of hypernet/calibration.py.

:class:`ReferenceCalibration` draws from reference images (VAE-encoded) and prompts (CLIP-encoded) per side, as the
ZipLoRA node takes them: each draw a reference latent noised at a random timestep with its side's conditioning, the
prediction ComfyUI's ``apply_model`` gives, the branch injected by the one injector (branch.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ...hypernet.errors import LoraRarError
from ...hypernet.layers import SIDES
from ...hypernet.runtime import RuntimeBranch
from .branch import inject
from .sampling import loaded, model_conditioning, noised_batch, prediction, timestep_count


class _Run:
    """The patched, loaded model of one ``running`` block (hypernet.calibration.CalibrationRun)."""

    def __init__(self, patched, data: dict[str, tuple]):
        self.patched, self.data = patched, data

    def draw(self, side: str, generator: torch.Generator):
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
        patched, _, skipped = inject(self.model, branch, self.paths)
        if skipped:
            name, why = next(iter(skipped.items()))
            raise LoraRarError(f"ZipLoRA: {len(skipped)} layers of {self.files} cannot run in this model's forward "
                               f"(e.g. {name}: {why})")
        with loaded(patched):  # the draws too: the model's noise schedule is on its device once loaded
            yield _Run(patched, self.data)
