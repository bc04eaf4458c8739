"""The runtime branch: what a merge adds to layers' forwards while the model runs, beside its static layers.

Some methods are not one fixed LoRA: K-LoRA chooses the subject's or the style's update per sampling step,
ZipLoRA optimises coefficients through the model, training routes every forward to the pair being trained.
All of them are the same thing to the host: per layer an addition h(x) to the layer's output, and a router that
decides what h adds right now. ComfyUI's side (nodes/adapter/branch.py) injects any :class:`RuntimeBranch`
the same way, and knows nothing of the method behind it.

Two objects, because a merge result is cached and shared while every patched MODEL keeps its own state:

- :class:`RuntimePart`: what a merge returns beside its static layers (immutable, cached with the merge): the
  updates it may add per layer (checked for fit and overflow before anything is patched), a summary for the
  report, and :meth:`RuntimePart.branch`, which makes a fresh branch for one patched model;
- :class:`RuntimeBranch`: one patched model's branch: h(x) per layer, and the router's state.
"""

from __future__ import annotations

from typing import Iterable

import torch

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layers import LowRankLayer


class RuntimeBranch:
    """h(x) per layer for one patched model. Subclasses implement :meth:`extra`; a router that follows the
    sampler (``follows_sampling``) gets the progress p in [0, 1] of every model call in :meth:`at_progress`
    (:func:`schedule_progress`: the call's place in the sampler's schedule)."""

    follows_sampling: bool = False

    def layer_names(self) -> Iterable[str]:
        raise NotImplementedError

    def misfit(self, name: str, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> str | None:
        """Why layer ``name``'s addition does not fit the host's weight of this shape (None: it fits)."""
        return None

    def extra(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """What to add to layer ``name``'s output for input ``x`` now, (..., d_out) (None: nothing). ``x`` is
        (..., d_in), channels last, for a linear and a 1x1 conv alike: the injector moves a conv's channels and
        back. A kxk conv is never a runtime layer (a merge claiming one is refused): decline it in ``claim``."""
        raise NotImplementedError

    def at_progress(self, p: float) -> None:
        """The sampler's progress of the coming model call (0: first step, 1: last)."""


class RuntimePart:
    """The runtime part of a merge result (cached and shared): subclasses set ``method`` and implement
    :meth:`updates`, :meth:`branch` and :meth:`summary`."""

    method: str = ""  # no LoRA file holds it: saving one is refused with its method's ``unsavable`` reason

    def layer_names(self) -> list[str]:
        raise NotImplementedError

    def updates(self, name: str) -> list[tuple[str, LowRankLayer]]:
        """(side, update) of every update layer ``name`` may add at once, side "subject", "style" or "both" (the
        file it comes from), e.g. ("subject", dW_c): each is checked against the host's weight (fit, overflow in
        the model's dtype) before the model is patched."""
        raise NotImplementedError

    def branch(self) -> RuntimeBranch:
        """A fresh branch for one patched model (its own router state)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """What the report and the saved metadata record (JSON-able)."""
        return {}

    def summary_line(self) -> str:
        """The report's line about it."""
        return ""


def schedule_progress(sigma: float, sigmas: list[float]) -> float:
    """The progress p in [0, 1] of noise level ``sigma`` in a decreasing schedule of len(sigmas) - 1 steps.

    p = index / steps with the index of sigma in the schedule, interpolated linearly between two schedule
    points (second-order samplers evaluate there: heun at the next point, dpm_2 between); 0 at or above the
    first sigma, 1 below the last.
    """
    steps = len(sigmas) - 1
    if steps < 1 or sigma >= sigmas[0]:
        return 0.0
    for index in range(steps):
        high, low = sigmas[index], sigmas[index + 1]
        if high >= sigma >= low:
            fraction = (high - sigma) / (high - low) if high > low else 0.0
            return min(1.0, (index + fraction) / steps)
    return 1.0


class FactorCache:
    """A layer's factors converted once per (device, dtype) the host's forward runs in, not on every call."""

    def __init__(self):
        self._cast: dict[tuple, tuple] = {}

    def get(self, key: tuple, layer: LowRankLayer, device: torch.device, dtype: torch.dtype) -> tuple:
        """(down (r, d_in), up (d_out, r), bias or None) of ``layer`` on ``device`` in ``dtype``; scale folded in."""
        full = (*key, device, dtype)
        if full not in self._cast:
            up = layer.up.flatten(1) * layer.scale if layer.scale != 1 else layer.up.flatten(1)
            self._cast[full] = (layer.down.flatten(1).to(device, dtype), up.to(device, dtype),
                                None if layer.bias is None else layer.bias.to(device, dtype))
        return self._cast[full]


def low_rank_apply(x: torch.Tensor, factors: tuple) -> torch.Tensor:
    """up(down(x)) (+ bias) for x (..., d_in), from :meth:`FactorCache.get`'s factors."""
    down, up, bias = factors
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up, bias)
