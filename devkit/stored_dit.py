"""A synthetic DiT (devkit/synthetic_dit.py) written the way released checkpoints store it: ComfyUI's scaled fp8, or bf16.

Scaled fp8 is the layout of ComfyUI's own ``*_fp8_scaled`` diffusion-model files (and of what its model saving writes
for such a model): every linear weight (a 2-dim ``*.weight``) as float8_e4m3fn ``w / s`` beside a float32 scalar
``*.scale_weight`` ``s = max|w| / 448`` (448: the largest e4m3fn value), every other tensor in bf16, and the marker key
``scaled_fp8``, an empty float8_e4m3fn tensor (a 2-element one would ask for full-precision matmuls). ComfyUI 0.33+
reads it in comfy/utils.py ``convert_old_quants`` (per-layer ``float8_e4m3fn`` quantised tensors); 0.3.x in
comfy/model_detection.py ``model_config_from_unet`` (``scaled_fp8_ops``: fp8 weights with a ``scale_weight`` each).

Only torch and safetensors are needed. Files are written atomically and rewritten only when missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from devkit.synthetic_models import save_atomic

FP8 = torch.float8_e4m3fn
FORMATS = ("scaled_fp8", "bf16")


def scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (any float dtype) in ComfyUI's scaled fp8 layout (module docstring)."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            weight = tensor.float()
            scale = (weight.abs().max() / torch.finfo(FP8).max).clamp_min(torch.finfo(torch.float32).tiny)
            out[key] = (weight / scale).to(FP8)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor.to(torch.bfloat16)
    return out


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.to(torch.bfloat16) for key, tensor in state.items()}


def write(source: Path, fmt: str, folder: Path) -> Path:
    """The model file ``source`` stored as ``fmt`` ("scaled_fp8" or "bf16") in ``folder``; returns its path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown storage {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(folder) / f"{Path(source).stem}-{fmt}.safetensors"
    if not path.is_file():
        save_atomic((scaled_fp8 if fmt == "scaled_fp8" else bf16)(load_file(str(source))), path,
                     {"lorarar_stored_from": Path(source).name})
    return path
