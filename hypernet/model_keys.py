"""LoRA layers matched to one model through its host's key map: any family, any format the host reads.

ComfyUI builds, per loaded model, a map from every LoRA layer name it understands (kohya, diffusers / PEFT,
its own ``diffusion_model.<module>``, trainers' variants) to the model weight it patches: a key, or
``(key, (dim, start, length))`` for a band of a fused weight (a Flux block's qkv receives diffusers'
separate to_q / to_k / to_v). This module takes that map as plain data (no ComfyUI import) and groups a
LoRA's tensors by the weight they patch:

- each model weight becomes one layer named by its canonical kohya name (``lora_unet_<module>`` for the
  diffusion model, ``lora_te1_...`` style for text encoders), so two LoRAs in different formats pair up;
- the pieces of a fused weight are joined into one low-rank layer of the whole weight: up is block-diagonal
  over the pieces' row bands, down stacks their downs, so the rank is the sum of the pieces' ranks and no
  dense update is formed. Every merge method then treats the fused linear as the one layer it is;
- layers the map does not know are listed (``LoraFile.unmapped``), never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base_models import UNetLayout
from .errors import LoraRarError
from .keys import canonical_name, is_text_encoder, split_key
from .layers import LoraFile, LowRankLayer, OtherLayer
from .names import target_key
from .tensors import check_finite_tensors, layer_from_roles, notes_for

_UNET = "diffusion_model."
_TE_PREFERENCE = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")
_TE_STEMS = ("text_encoder.", "text_encoder_2.", "text_encoders.")  # diffusers / PEFT text-encoder stems


def module_layer_name(module: str) -> str:
    """The canonical layer name of a diffusion-model module path: ``double_blocks.0.img_attn.qkv`` ->
    ``lora_unet_double_blocks_0_img_attn_qkv`` (the name kohya writes, and the one every merge uses)."""
    return "lora_unet_" + module.replace(".", "_")


def canonical_names(key_map: dict) -> dict[str, str]:
    """Model weight key -> its layer's canonical name: ``lora_unet_<module with _>`` for the diffusion model,
    the map's own kohya name (lora_te1_ first) for a text encoder. Only whole-weight entries count."""
    names: dict[str, str] = {}
    for name, target in key_map.items():
        if not isinstance(target, str) or target in names:
            continue
        if target.startswith(_UNET) and target.endswith(".weight"):
            names[target] = module_layer_name(target[len(_UNET):-len(".weight")])
    text = {}
    for name, target in key_map.items():
        if isinstance(target, str) and not target.startswith(_UNET) and name.startswith("lora_te"):
            rank = next(i for i, prefix in enumerate((*_TE_PREFERENCE, "lora_te")) if name.startswith(prefix))
            if target not in text or rank < text[target][0]:
                text[target] = (rank, name)
    names.update({target: name for target, (_, name) in text.items()})
    return names


def _band(target, path: Path, stem: str) -> tuple[int, int] | None:
    """(first row, rows) a band target patches; None for a whole weight. Only bands of output rows exist."""
    if isinstance(target, str):
        return None
    dim, start, length = target[1][:3]
    if dim != 0:
        raise LoraRarError(f"{path}: layer {stem} patches a slice along dimension {dim} of {target[0]}; "
                           f"only bands of output rows can be merged")
    return int(start), int(length)


def lora_for_model(tensors: dict[str, torch.Tensor], path: str | Path, key_map: dict,
                   shapes: dict[str, tuple[int, ...]], sha256: str = "", layout: UNetLayout | None = None,
                   host: str = "this ComfyUI", text_encoders: bool = True) -> LoraFile:
    """Group a LoRA state dict by the model weights ``key_map`` sends its layers to.

    shapes: weight key -> shape (the rows of a fused weight); layout: a UNet layout lets the pack's own SDXL
    names (keys.canonical_name) read stems the map does not know; host: names the host in messages;
    text_encoders: False when the map holds no text encoder (no CLIP connected), to say so about their layers.
    """
    path = Path(path)
    if not tensors:
        raise LoraRarError(f"{path}: empty LoRA (the file holds no tensors)")
    check_finite_tensors(tensors, path)
    names = canonical_names(key_map)
    pieces, ignored, unmapped = _pieces(tensors, path, key_map, names, layout)
    text_layers = [] if text_encoders else [stem for stem in unmapped if _is_text_stem(stem)]
    if not pieces:
        _refuse_unmapped(path, tensors, unmapped, host, text_layers)
    layers = {name: _joined(name, parts, path, shapes) for name, parts in pieces.items()}
    notes = notes_for(tensors)
    if text_layers:
        notes.append(f"{len(text_layers)} text-encoder layers not merged: no CLIP is connected (connect one to merge them)")
    return LoraFile(path=str(path), sha256=sha256, layers=layers, ignored_keys=ignored, notes=notes,
                    unmapped=unmapped)


def _is_text_stem(stem: str) -> bool:
    return is_text_encoder(stem) or stem.startswith(_TE_STEMS)


def _shown(stem: str) -> str:
    """A layer name from a file, on one line and at most 100 characters (file keys are free text)."""
    return " ".join(stem.split())[:100]


def _pieces(tensors, path: Path, key_map: dict, names: dict[str, str], layout):
    """({canonical name: [(stem, band, layer, weight key)]}, ignored tensor keys, unmapped layer stems)."""
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    ignored: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            ignored.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = (key, tensor)
    pieces: dict[str, list] = {}
    unmapped: list[str] = []
    for stem, parts in grouped.items():
        target = key_map.get(stem)
        name = names.get(target_key(target)) if target is not None else None
        if target is None and layout is not None:
            name = canonical_name(stem, layout)  # the pack's SDXL names: formats ComfyUI's map lacks (unet.unet.)
            target = name if name is not None else None
        if name is None:
            unmapped.append(stem)
            continue
        layer = layer_from_roles(path, stem, {r: t for r, (_, t) in parts.items()}, {r: k for r, (k, _) in parts.items()})
        pieces.setdefault(name, []).append((stem, _band(target, path, stem), layer, target_key(target)))
    return pieces, ignored, unmapped


def _refuse_unmapped(path: Path, tensors: dict, unmapped: list[str], host: str, text_layers: list[str]):
    if not unmapped:
        raise LoraRarError(
            f"{path}: not a LoRA: none of its {len(tensors)} tensors is a LoRA factor (lora_up/lora_down, "
            f"lora_A/lora_B, ...); first keys: {', '.join(sorted(tensors)[:3])}")
    if text_layers and len(text_layers) == len(unmapped):
        raise LoraRarError(
            f"{path}: all its {len(unmapped)} LoRA layers are text-encoder layers (e.g. {_shown(sorted(unmapped)[0])}) "
            f"and no CLIP is connected: connect the CLIP to the merge node")
    raise LoraRarError(
        f"{path}: none of its {len(unmapped)} LoRA layers is a layer {host} maps onto this model (e.g. "
        f"{_shown(sorted(unmapped)[0])}): it is a LoRA for another model, or a format this ComfyUI version does not read")


def _joined(name: str, parts: list, path: Path, shapes: dict) -> LowRankLayer | OtherLayer:
    """One layer from the pieces that patch one weight: a whole-weight piece as it is, bands joined."""
    other = next((layer for _, _, layer, _ in parts if isinstance(layer, OtherLayer)), None)
    if other is not None:
        return OtherLayer(kind=other.kind, keys=[k for _, _, layer, _ in parts for k in getattr(layer, "keys", [])])
    bands = [band for _, band, _, _ in parts]
    if len(parts) == 1 and bands[0] is None:
        return parts[0][2]
    if None in bands or len(set(bands)) != len(bands):
        # only the pieces that collide: a whole-weight piece collides with every band, a band with its own twin
        twice = sorted(_shown(stem) for stem, band, _, _ in parts
                       if band is None or None in bands or bands.count(band) > 1)
        raise LoraRarError(f"{path}: layers {', '.join(twice)} all patch {name} (the same layer written twice); "
                           "ComfyUI would apply only one: remove one of them")
    return _join_bands(name, parts, path, shapes)


def _join_bands(name: str, parts: list, path: Path, shapes: dict) -> LowRankLayer:
    """Pieces on row bands of one fused weight as one LoRA of it: up block-diagonal, down stacked, rank summed."""
    weight = parts[0][3]
    if weight not in shapes:
        raise LoraRarError(f"{path}: layer {name}: the model has no weight {weight}")
    rows = shapes[weight][0]
    d_in = {layer.d_in for _, _, layer, _ in parts}
    if len(d_in) != 1 or any(layer.conv_kernel for _, _, layer, _ in parts):
        raise LoraRarError(f"{path}: the pieces of {name} ({', '.join(s for s, _, _, _ in parts)}) have input widths "
                           f"{sorted(d_in)} or conv kernels; pieces of one fused linear share its input")
    # float32 whatever the pieces' type: each piece's scale is folded into its up, which in float16 would lose
    # small products to subnormals and turn large alphas into Inf (the whole-weight path keeps the scale apart)
    dtype = torch.float32
    rank = sum(layer.rank for _, _, layer, _ in parts)
    up = torch.zeros(rows, rank, dtype=dtype)
    bias = None
    column = 0
    for stem, (start, length), layer, _ in parts:
        if start < 0 or start + length > rows or layer.d_out != length:
            raise LoraRarError(f"{path}: layer {stem} updates {layer.d_out} rows, but its band of {name} is rows "
                               f"{start}..{start + length} of {rows}")
        up[start:start + length, column:column + layer.rank] = layer.up.to(dtype) * layer.scale
        if layer.bias is not None:
            bias = torch.zeros(rows, dtype=dtype) if bias is None else bias
            bias[start:start + length] += layer.bias.to(dtype)
        column += layer.rank
    down = torch.cat([layer.down.to(dtype) for _, _, layer, _ in parts])
    return LowRankLayer(up=up, down=down, scale=1.0, bias=bias)
