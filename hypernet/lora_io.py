"""LoRA files on disk <-> normalised layer factors.

Reading groups every tensor under its canonical kohya layer name (see keys.py) and checks what a
merge relies on: readable file, LoRA tensors present, up/down ranks that agree, finite values (the rules for one
layer's tensors are tensors.py's, shared with model_keys.py).
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
from .tensors import check_finite_tensors, layer_from_roles, notes_for, to_kohya_state_dict  # noqa: F401  (public here too)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # file tensor types offered


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
