"""The layers every stage passes along: one layer's low-rank update (``LowRankLayer``), a layer of another adapter
kind that is reported, not merged (``OtherLayer``), a LoRA file's layers by canonical name (``LoraFile``), and the
two LoRAs a merged layer comes from (``SIDES``, ``kept``).

Plain data, torch only: reading and writing them is lora_io.py (files) and model_keys.py (a model's key map), the
arithmetic on them lowrank.py, and every merge method builds them; none of those needs the others to hold one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SIDES = ("subject", "style")  # the two LoRAs of a merge, in the order every report names them


def kept(side: str) -> str:
    """The report's action for a layer taken from one LoRA alone (``kept (subject)``), as reports and saved
    metadata spell it; what the layer came from is the plan's ``sides``, never this text."""
    return f"kept ({side})"


@dataclass
class LowRankLayer:
    """One layer's update dW = scale * up @ down.

    up: (d_out, rank); down: (rank, d_in) with d_in the flattened input (c_in * kh * kw for convs);
    kernel: down's trailing conv dims ((1, 1) for 1x1 convs, () for linear), kept to write the file back.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    kernel: tuple[int, ...] = ()
    bias: torch.Tensor | None = None  # (d_out,) bias difference stored beside the factors, not scaled by alpha

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def d_out(self) -> int:
        return self.up.shape[0]

    @property
    def d_in(self) -> int:
        return self.down.shape[1]

    @property
    def conv_kernel(self) -> tuple[int, ...]:
        """The kernel, with 1x1 counted as linear: ComfyUI applies both to a weight the same way."""
        return self.kernel if math.prod(self.kernel) != 1 else ()

    def misfit(self, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> str | None:
        """Why this update cannot patch a model weight of ``weight_shape`` as meant, or None when it fits.

        ComfyUI reshapes up @ down to the weight's shape whenever the element counts agree, so transposed
        factors or a 3x3 kernel on a linear layer would be applied scrambled: the shapes must agree exactly.
        """
        weight_kernel = tuple(weight_shape[2:]) if math.prod(weight_shape[2:]) != 1 else ()
        fits = (len(weight_shape) >= 1 and self.d_out == weight_shape[0] and self.d_in == math.prod(weight_shape[1:])
                and self.conv_kernel in ((), weight_kernel))
        if not fits:
            kernel = f" with a {self.kernel} kernel" if self.conv_kernel else ""
            return f"update of shape ({self.d_out}, {self.d_in}){kernel} does not fit the model's weight {tuple(weight_shape)}"
        if self.bias is not None and (bias_shape is None or tuple(bias_shape) != (self.d_out,)):
            found = f"a bias of shape {tuple(bias_shape)}" if bias_shape is not None else "no bias"
            return f"bias difference of {self.d_out} values but the model's layer has {found}"
        return None


@dataclass
class OtherLayer:
    """A layer whose adapter is not a plain up @ down product (LoHa, LoKr, DoRA, Tucker LoCon, ...)."""

    kind: str
    keys: list[str]


@dataclass
class LoraFile:
    path: str
    sha256: str
    layers: dict[str, LowRankLayer | OtherLayer]
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading changed on purpose, e.g. fp8 widened
    unmapped: list[str] = field(default_factory=list)  # layer stems the model's key map does not know (model_keys)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def context_dims(self) -> set[int]:
        """Widths of the text context read by cross-attention (attn2 to_k/to_v): 2048 for SDXL, 768 for SD1.5."""
        return {layer.d_in for name, layer in self.layers.items()
                if isinstance(layer, LowRankLayer) and name.endswith(("_attn2_to_k", "_attn2_to_v"))}
