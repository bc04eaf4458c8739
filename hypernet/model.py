"""The LoRA.rar hypernetwork: per input column, two merge coefficients from a subject/style update pair.

Architecture of the published checkpoints (parameter names kept so they load unchanged):
``input_<k>``: Linear(2 * width_k -> hidden), one per attention width the network serves
(input_1: width 640, input_2: width 1280 for SDXL / KOALA-700M), then ``output`` = ReLU,
Linear(hidden -> 2). No output activation: coefficients are unbounded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import LoraRarError
from .files import file_sha256, read_state_dict

_INPUT_KEY = re.compile(r"^(input_\d+)\.weight$")


def _check_tensor_types(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """H runs in float32: floating-point tensors widen exactly (fp8, fp16, bf16); others cannot mean weights."""
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise LoraRarError(f"{source}: hypernet tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; "
                               f"expected floating-point weights")


class LoraRarHypernet(nn.Module):
    """Hypernetwork H with one input layer per attention width.

    ``widths`` maps attention width (d_out of the LoRA update) to the input layer serving it, so a
    network trained for another base model (other widths, more input layers) loads through this class.
    """

    def __init__(self, input_features: dict[str, int], hidden: int = 128):
        super().__init__()
        for name, in_features in sorted(input_features.items()):
            if in_features % 2 or in_features == 0 or hidden < 1:
                raise LoraRarError(f"hypernet input layer {name}: {in_features} input features to {hidden} hidden units "
                                   f"is not 2 x width to at least 1")
            self.add_module(name, nn.Linear(in_features, hidden))
        self.output = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 2))
        self.widths: dict[int, str] = {}
        for name, in_features in input_features.items():
            width = in_features // 2
            if width in self.widths:
                raise LoraRarError(f"hypernet input layers {self.widths[width]} and {name} both serve width {width}")
            self.widths[width] = name
        self.sha256: str | None = None
        self.source: str | None = None
        # ComfyUI model classes the file says it was trained for (metadata lorarar_model_classes); () = not said
        self.model_classes: tuple[str, ...] = ()

    @property
    def hidden(self) -> int:
        return self.output[1].in_features

    def input_layer(self, width: int) -> nn.Linear | None:
        """The input layer for attention width ``width``, or None when the network has none."""
        name = self.widths.get(width)
        return None if name is None else getattr(self, name)

    def forward(self, columns: torch.Tensor, width: int) -> torch.Tensor:
        """Dense reference path. columns: (n, 2 * width) = [subject column ; style column] -> (n, 2)."""
        layer = self.input_layer(width)
        if layer is None:
            raise LoraRarError(f"hypernet has no input layer for attention width {width} (has {sorted(self.widths)})")
        return self.output(layer(columns))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "<state dict>") -> "LoraRarHypernet":
        """Build from a state dict with keys input_<k>.weight/bias and output.1.weight/bias; checks every shape."""
        inputs = {}
        for key, tensor in state_dict.items():
            match = _INPUT_KEY.match(key)
            if match:
                if tensor.ndim != 2:
                    raise LoraRarError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected (hidden, 2 x width)")
                inputs[match.group(1)] = tensor.shape[1]
        out_weight = state_dict.get("output.1.weight")
        if not inputs or out_weight is None:
            raise LoraRarError(
                f"{source}: not a LoRA.rar hypernet (expected input_<k>.weight and output.1.weight, "
                f"found {sorted(state_dict)[:6]})"
            )
        if out_weight.ndim != 2 or out_weight.shape[0] != 2 or out_weight.shape[1] == 0:
            raise LoraRarError(f"{source}: output.1.weight has shape {tuple(out_weight.shape)}, expected (2, hidden)")
        _check_tensor_types(state_dict, source)
        try:
            net = cls(inputs, hidden=out_weight.shape[1])
        except LoraRarError as error:  # the layer-level checks do not know the file
            raise LoraRarError(f"{source}: {error}") from None
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state_dict.items()}
        if expected != found:
            diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            detail = ", ".join(f"{k}: expected {expected.get(k)}, found {found.get(k)}" for k in diff[:3])
            raise LoraRarError(f"{source}: hypernet tensors do not fit together ({detail})")
        for key, tensor in state_dict.items():
            if not torch.isfinite(tensor.float()).all():
                raise LoraRarError(f"{source}: hypernet tensor {key} holds NaN or Inf values")
        net.load_state_dict({k: v.float() for k, v in state_dict.items()})
        net.source = source
        return net.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path) -> "LoraRarHypernet":
        """Load a checkpoint (.safetensors, or .pth/.pt through ``weights_only=True``) and record its sha256."""
        path = Path(path)
        if not path.is_file():
            raise LoraRarError(f"{path}: hypernet file not found")
        net = cls.from_state_dict(read_state_dict(path, "LoRA.rar hypernet"), source=str(path))
        net.sha256 = file_sha256(path)
        net.model_classes = model_classes_of(path)
        return net


MODEL_CLASSES_KEY = "lorarar_model_classes"  # safetensors metadata: comma-separated ComfyUI model classes, "Flux,FluxSchnell"


def shown_model_classes(classes: tuple[str, ...]) -> str:
    """The model classes a hypernet's metadata names, for a message: the first three, each at most 40 characters
    (the metadata is free text a file can make megabytes long)."""
    shown = ", ".join(" ".join(name.split())[:40] for name in classes[:3])
    return shown + (f" and {len(classes) - 3} more" if len(classes) > 3 else "")


def model_classes_of(path: Path) -> tuple[str, ...]:
    """The model classes a .safetensors hypernet's metadata names (``lorarar_model_classes``); () for others."""
    if path.suffix != ".safetensors":
        return ()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(MODEL_CLASSES_KEY, "")
    return tuple(name.strip() for name in text.split(",") if name.strip())
