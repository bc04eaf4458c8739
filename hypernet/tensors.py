"""One layer's tensors <-> a layer: the rules every reader applies to a LoRA's tensors, whether they come from a
file (lora_io.py) or through a model's key map (model_keys.py): float types the merge can use (fp8 widened to
float32, exactly), finite values, up / down / alpha / bias shapes that make a LoRA, adapters that are no plain
up @ down product recognised as such; and back, low-rank layers as the kohya tensors a file or ComfyUI's LoRA
patching takes (``to_kohya_state_dict``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import LoraRarError
from .layers import LowRankLayer, OtherLayer
from .names import split_key


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. A float32 sum is one pass with no temporary; only when it is not
    finite (a NaN/Inf, or huge finite values overflowing) does the exact element check run."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype not in MERGEABLE_DTYPES:  # fp8 has no isfinite kernel; widening to float32 is exact
        if not _is_float8(tensor):
            return True  # a type _usable refuses with its name, before anything uses it
        tensor = tensor.float()
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(tensor).all())


MERGEABLE_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# one float per byte: widening to float32 is exact (packed types such as float4_e2m1fn_x2 are not among them)
FLOAT8_DTYPES = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                   "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)}


def _is_float8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FLOAT8_DTYPES


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _usable(path: Path, key: str, tensor: torch.Tensor, number: bool = False) -> torch.Tensor:
    """A factor (or, with number=True, an alpha) as the merge uses it: fp8 widened to float32, which is exact;
    integer, bool and complex tensors refused, as the merge could not use them as the file means them."""
    usable = tensor.dtype in MERGEABLE_DTYPES or _is_float8(tensor) or (
        number and not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool)
    if not usable:
        raise LoraRarError(f"{path}: tensor {key} is {_dtype_name(tensor)}; LoRA tensors must be fp32, fp16, bf16 "
                           f"or fp8 (packed and integer types cannot be merged as they are): convert the file")
    return tensor.float() if _is_float8(tensor) else tensor


def layer_from_roles(path: Path, stem: str, roles: dict[str, torch.Tensor], keys: dict[str, str]) -> LowRankLayer | OtherLayer:
    """One layer's tensors (by role: up, down, alpha, bias, ...) as a LowRankLayer, or an OtherLayer for adapters
    that are no plain up @ down product; refuses factors whose shapes, types or alpha do not make a LoRA."""
    other = [role[len("other:"):] for role in roles if role.startswith("other:")]
    if other:
        return OtherLayer(kind=other[0], keys=list(keys.values()))
    if "up" not in roles and "down" not in roles and "bias" in roles:
        return OtherLayer(kind="bias difference without factors", keys=list(keys.values()))
    if "up" not in roles or "down" not in roles:
        raise LoraRarError(f"{path}: layer {stem} has no {'down' if 'up' in roles else 'up'} factor")
    if "dora_scale" in roles:
        return OtherLayer(kind="DoRA", keys=list(keys.values()))
    if "mid" in roles:
        return OtherLayer(kind="LoCon (Tucker mid)", keys=list(keys.values()))
    up, down = (_usable(path, keys[role], roles[role]) for role in ("up", "down"))
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise LoraRarError(f"{path}: layer {stem} has factors of shapes {tuple(up.shape)} and {tuple(down.shape)}, expected (out, rank) and (rank, in)")
    if up.shape[1] != down.shape[0]:
        raise LoraRarError(f"{path}: layer {stem}: up has rank {up.shape[1]} but down has rank {down.shape[0]}")
    if up.numel() == 0 or down.numel() == 0:
        raise LoraRarError(f"{path}: layer {stem} has empty factors (shapes {tuple(up.shape)} and {tuple(down.shape)}); "
                           f"rank, input and output width must be at least 1")
    rank = down.shape[0]
    bias = _usable(path, keys["bias"], roles["bias"]).reshape(-1) if "bias" in roles else None
    if bias is not None and bias.numel() != up.shape[0]:
        raise LoraRarError(f"{path}: layer {stem}: bias difference has {bias.numel()} values for an output width of {up.shape[0]}")
    return LowRankLayer(up=up.reshape(up.shape[0], rank), down=down.reshape(rank, -1),
                        scale=_alpha(path, keys, roles) / rank if "alpha" in roles else 1.0,
                        kernel=tuple(down.shape[2:]), bias=bias)


def _alpha(path: Path, keys: dict[str, str], roles: dict[str, torch.Tensor]) -> float:
    alpha = _usable(path, keys["alpha"], roles["alpha"], number=True)
    if alpha.numel() != 1:
        raise LoraRarError(f"{path}: tensor {keys['alpha']} holds {alpha.numel()} values of shape {tuple(alpha.shape)}; "
                           f"alpha must be one number")
    return float(alpha.double().item())


def check_finite_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a file holding a LoRA tensor with NaN or Inf values, naming the tensor."""
    for key, tensor in tensors.items():
        if split_key(key) is not None and not _all_finite(tensor):
            raise LoraRarError(f"{path}: tensor {key} holds NaN or Inf values")


def notes_for(tensors: dict[str, torch.Tensor]) -> list[str]:
    """What reading changes on purpose: fp8 factors widened to float32 (exact), counted per type in layers."""
    widened: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is not None and split[1] in ("up", "down") and _is_float8(tensor):
            widened.setdefault(_dtype_name(tensor), set()).add(split[0])
    return [f"{dtype} factors of {len(stems)} layers widened to float32 (exact)" for dtype, stems in sorted(widened.items())]


def to_kohya_state_dict(layers: dict[str, LowRankLayer], dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """kohya tensors for low-rank layers; the scale is folded into down and alpha = rank (scale 1 on reload).

    dtype None keeps each layer's own type. A layer that float16 cannot hold (its values overflow) is
    written in float32 rather than as Inf.
    """
    state_dict = {}
    for name, layer in layers.items():
        down = layer.down * layer.scale if layer.scale != 1.0 else layer.down
        up = layer.up
        if layer.kernel:
            down = down.reshape(layer.rank, -1, *layer.kernel)
            up = up.reshape(layer.d_out, layer.rank, *([1] * len(layer.kernel)))
        tensors = {"lora_up.weight": up, "lora_down.weight": down}
        if layer.bias is not None:
            tensors["diff_b"] = layer.bias
        layer_dtype = dtype or layer.down.dtype
        if layer_dtype == torch.float16 and not all(torch.isfinite(t.to(layer_dtype)).all() for t in tensors.values()):
            layer_dtype = torch.float32
        for suffix, tensor in tensors.items():
            state_dict[f"{name}.{suffix}"] = tensor.to(layer_dtype).contiguous().cpu()
        # float32: a rank such as 257 is not representable in bf16, and alpha / rank must stay exactly 1
        state_dict[f"{name}.alpha"] = torch.tensor(float(layer.rank), dtype=torch.float32)
    return state_dict
