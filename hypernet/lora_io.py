"""LoRA files on disk <-> normalised layer factors.

Reading groups every tensor under its canonical kohya layer name (see keys.py) and checks what a
merge relies on: readable file, LoRA tensors present, up/down ranks that agree, finite values.
Writing produces a kohya-format .safetensors atomically (temp file in the same folder, then rename).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base_models import SDXL, UNetLayout
from .errors import LoraRarError
from .files import atomic_file, file_sha256
from .keys import canonical_name, split_key

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # file tensor types offered


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

    @property
    def name(self) -> str:
        return Path(self.path).name

    def context_dims(self) -> set[int]:
        """Widths of the text context read by cross-attention (attn2 to_k/to_v): 2048 for SDXL, 768 for SD1.5."""
        return {layer.d_in for name, layer in self.layers.items()
                if isinstance(layer, LowRankLayer) and name.endswith(("_attn2_to_k", "_attn2_to_v"))}


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. A float32 sum is one pass with no temporary; only when it is not
    finite (a NaN/Inf, or huge finite values overflowing) does the exact element check run."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(tensor).all())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise many types; the user needs one line
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "weights_only" in text or "Unsupported global" in text:
            reason = "a pickle holding more than plain tensors, refused (only weights_only=True loads)"
        raise LoraRarError(f"{path}: cannot read LoRA file ({reason}); is it truncated or not a .safetensors file?") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraRarError(f"{path}: not a LoRA: expected a dict of tensors")
    return data


def read_lora(path: str | Path, layout: UNetLayout = SDXL) -> LoraFile:
    """Read a LoRA file into canonical layers. Raises LoraRarError with the file and problem on bad input."""
    path = Path(path)
    if not path.is_file():
        raise LoraRarError(f"{path}: LoRA file not found")
    return lora_from_tensors(_read_tensors(path), path, file_sha256(path), layout)


def lora_from_tensors(tensors: dict[str, torch.Tensor], path: str | Path, sha256: str = "",
                      layout: UNetLayout = SDXL) -> LoraFile:
    """Group a LoRA state dict into canonical layers (what read_lora does after reading the file).

    ``path`` names the source in errors and reports; the tensors are used as they are, not copied.
    """
    path = Path(path)
    if not tensors:
        raise LoraRarError(f"{path}: empty LoRA (the file holds no tensors)")

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    stems: dict[str, str] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        name = canonical_name(split[0], layout) if split else None
        if name is None:
            ignored.append(key)
            continue
        if stems.setdefault(name, split[0]) != split[0]:
            raise LoraRarError(f"{path}: layers {stems[name]} and {split[0]} are the same layer ({name}) written twice")
        grouped.setdefault(name, {})[f"{split[1]}|{key}"] = tensor

    if not grouped:
        raise LoraRarError(
            f"{path}: not a LoRA: none of its {len(tensors)} tensors is a LoRA factor "
            f"(lora_up/lora_down, lora_A/lora_B, ...); first keys: {', '.join(sorted(tensors)[:3])}"
        )

    layers: dict[str, LowRankLayer | OtherLayer] = {}
    for name, parts in grouped.items():
        roles = {tag.split("|", 1)[0]: tensor for tag, tensor in parts.items()}
        keys = [tag.split("|", 1)[1] for tag in parts]
        for key, tensor in zip(keys, parts.values()):
            if not _all_finite(tensor):
                raise LoraRarError(f"{path}: tensor {key} holds NaN or Inf values")
        other = [role[len("other:"):] for role in roles if role.startswith("other:")]
        if other:
            layers[name] = OtherLayer(kind=other[0], keys=keys)
            continue
        if "up" not in roles and "down" not in roles and "bias" in roles:
            layers[name] = OtherLayer(kind="bias difference without factors", keys=keys)
            continue
        if "up" not in roles or "down" not in roles:
            missing = "down" if "up" in roles else "up"
            raise LoraRarError(f"{path}: layer {stems[name]} has no {missing} factor")
        if "dora_scale" in roles:
            layers[name] = OtherLayer(kind="DoRA", keys=keys)
            continue
        if "mid" in roles:
            layers[name] = OtherLayer(kind="LoCon (Tucker mid)", keys=keys)
            continue
        up, down = roles["up"], roles["down"]
        if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise LoraRarError(f"{path}: layer {stems[name]} has factors of shapes {tuple(up.shape)} and {tuple(down.shape)}, expected (out, rank) and (rank, in)")
        if up.shape[1] != down.shape[0]:
            raise LoraRarError(f"{path}: layer {stems[name]}: up has rank {up.shape[1]} but down has rank {down.shape[0]}")
        rank = down.shape[0]
        scale = float(roles["alpha"].float().item()) / rank if "alpha" in roles else 1.0
        layers[name] = LowRankLayer(
            up=up.reshape(up.shape[0], rank),
            down=down.reshape(rank, -1),
            scale=scale,
            kernel=tuple(down.shape[2:]),
            bias=roles["bias"].reshape(-1) if "bias" in roles else None,
        )
    return LoraFile(path=str(path), sha256=sha256, layers=layers, ignored_keys=ignored)


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


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, object], overwrite: bool = False) -> Path:
    """Write a .safetensors file atomically; refuses to replace an existing file unless overwrite=True."""
    from safetensors.torch import save_file

    text_metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_file(path, overwrite) as temp:
        save_file(state_dict, str(temp), metadata=text_metadata)
    return path
