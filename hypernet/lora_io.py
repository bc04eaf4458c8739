"""LoRA files on disk <-> normalised layer factors.

Reading groups every tensor under its canonical kohya layer name (see keys.py) and checks what a
merge relies on: readable file, LoRA tensors present, up/down ranks that agree, finite values.
Writing produces a kohya-format .safetensors atomically (temp file in the same folder, then rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base_models import SDXL, UNetLayout
from .errors import LoraRarError
from .files import atomic_file, check_target, file_sha256, read_state_dict, refuse_replacing
from .keys import canonical_name, split_key
from .layers import LoraFile, LowRankLayer, OtherLayer  # noqa: F401  (read and written here; public here too)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # file tensor types offered


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


def read_lora(path: str | Path, layout: UNetLayout = SDXL, *, keep_unknown: bool = False) -> LoraFile:
    """Read a LoRA file into canonical layers. Raises LoraRarError with the file and problem on bad input.

    keep_unknown: layers whose stem the SDXL parser does not know (a Flux or SD3.5 diffusers name such as
    ``transformer.transformer_blocks.0.attn.to_q``) are kept under the stem as written instead of ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraRarError(f"{path}: LoRA file not found")
    return lora_from_tensors(read_state_dict(path, "LoRA"), path, file_sha256(path), layout, keep_unknown=keep_unknown)


def lora_from_tensors(tensors: dict[str, torch.Tensor], path: str | Path, sha256: str = "",
                      layout: UNetLayout = SDXL, *, keep_unknown: bool = False) -> LoraFile:
    """Group a LoRA state dict into canonical layers (what read_lora does after reading the file).

    ``path`` names the source in errors and reports; the tensors are used as they are, not copied.
    keep_unknown: see :func:`read_lora`.
    """
    path = Path(path)
    if not tensors:
        raise LoraRarError(f"{path}: empty LoRA (the file holds no tensors)")
    check_finite_tensors(tensors, path)
    grouped, stems, ignored = _group_by_layer(tensors, path, layout, keep_unknown)
    layers: dict[str, LowRankLayer | OtherLayer] = {}
    for name, parts in grouped.items():
        roles = {role: tensor for role, (_, tensor) in parts.items()}
        keys = {role: key for role, (key, _) in parts.items()}
        layers[name] = layer_from_roles(path, stems[name], roles, keys)
    return LoraFile(path=str(path), sha256=sha256, layers=layers, ignored_keys=ignored, notes=notes_for(tensors))


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


def _group_by_layer(tensors: dict[str, torch.Tensor], path: Path, layout: UNetLayout, keep_unknown: bool = False):
    """({canonical name: {role: (key, tensor)}}, {canonical name: stem as written}, keys that are no LoRA tensor).

    keep_unknown: a LoRA tensor whose stem has no canonical name is grouped under the stem as written.

    Refuses a file where no key is a LoRA tensor, or one layer written twice under two spellings.
    """
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    ignored: list[str] = []
    stems: dict[str, str] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        name = canonical_name(split[0], layout) if split else None
        if name is None and split and keep_unknown:
            name = split[0]
        if name is None:
            ignored.append(key)
            continue
        if stems.setdefault(name, split[0]) != split[0]:
            raise LoraRarError(f"{path}: layers {stems[name]} and {split[0]} are the same layer ({name}) written twice")
        grouped.setdefault(name, {})[split[1]] = (key, tensor)
    if not grouped:
        raise LoraRarError(
            f"{path}: not a LoRA: none of its {len(tensors)} tensors is a LoRA factor "
            f"(lora_up/lora_down, lora_A/lora_B, ...); first keys: {', '.join(sorted(tensors)[:3])}"
        )
    return grouped, stems, ignored


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


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, object], overwrite: bool = False,
              protect: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file atomically; refuses to replace an existing file unless overwrite=True, and
    never replaces one of ``protect`` ({role: path}, the merge's own inputs), whatever overwrite says."""
    from safetensors.torch import save_file

    text_metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    refuse_replacing(check_target(path), protect or {})
    with atomic_file(path, overwrite) as temp:
        try:
            save_file(state_dict, str(temp), metadata=text_metadata)
        except Exception as error:  # safetensors raises its own error type for a full disk, not OSError
            reason = " ".join(str(error).split()) or type(error).__name__
            raise LoraRarError(f"{path}: could not write the merged LoRA ({reason})") from None
    return path
