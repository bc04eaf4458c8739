"""Random LoRAs for the synthetic DiT models (devkit/synthetic_dit.py), in the file formats trainers write.

Each family has one table from its native (ComfyUI / released-file) linear to the diffusers modules that
train it. Where the native model fuses projections, diffusers keeps them apart and a LoRA file then
holds one factor pair per piece, each updating a band of the fused weight's output rows:

    Flux double block   img_attn.qkv  <- attn.to_q | attn.to_k | attn.to_v                (hidden rows each)
                        txt_attn.qkv  <- attn.add_q_proj | add_k_proj | add_v_proj
    Flux single block   linear1       <- attn.to_q | attn.to_k | attn.to_v | proj_mlp    (hidden x3, then 4 hidden)
    SD3.5 joint block   x_block.attn.qkv, x_block.attn2.qkv  <- attn(2).to_q | to_k | to_v
                        context_block.attn.qkv               <- attn.add_q_proj | add_k_proj | add_v_proj

Formats (``FORMATS[family]``):
    kohya      ``lora_unet_<native with _>.lora_up/.lora_down/.alpha``: one pair per native (fused) linear
    comfy      ``diffusion_model.<native>.lora_up/.lora_down/.alpha``: ComfyUI's generic form, one pair per native linear
    peft       ``transformer.<diffusers>.lora_B/.lora_A.weight``: split pieces (diffusers / PEFT trainers)
    diffsynth  ``<diffusers>.lora_B/.lora_A.weight`` with no prefix (Flux; ComfyUI 0.33.0 maps it, 0.3.75 does not)

Only safetensors and torch are needed (shapes come from the model file's header).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.synthetic_dit import FLUX, DitFamily

FORMATS = {"flux": ("kohya", "comfy", "peft", "diffsynth"), "sd35": ("kohya", "comfy", "peft")}
# The formats each host's comfy.lora.model_lora_keys_unet maps (checked by tests/host/test_synthetic_dit.py).
FORMATS_BY_HOST = {"0.33.0": FORMATS, "0.3.75": {"flux": ("kohya", "comfy", "peft"), "sd35": ("kohya", "comfy", "peft")}}
FUSED_FORMATS = ("kohya", "comfy")  # one pair per native linear; the others split fused ones into pieces

# Native linears a LoRA trains: attention and MLP, not the modulation (adaLN) layers.
_TARGETS = {
    "flux": re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])\.weight$"),
    "sd35": re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc[12])\.weight$"),
}


@dataclass(frozen=True)
class Piece:
    """One diffusers module training rows [row_start, row_start + rows) of a native linear."""

    diffusers: str
    row_start: int
    rows: int


def native_linears(family: DitFamily, root=None) -> dict[str, tuple[int, int]]:
    """Native module name (no ``.weight``) -> (out_features, in_features) of every trainable linear."""
    out = {}
    with safe_open(str(family.path(root)), framework="pt") as f:
        for key in f.keys():
            if _TARGETS[family.name].match(key):
                d_out, d_in = f.get_slice(key).get_shape()
                out[key[:-len(".weight")]] = (int(d_out), int(d_in))
    return dict(sorted(out.items()))


def _split(prefix: str, names: tuple[str, ...], widths: tuple[int, ...]) -> list[Piece]:
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [Piece(f"{prefix}.{name}", start, width) for name, start, width in zip(names, starts, widths)]


def _flux_pieces(native: str, hidden: int) -> list[Piece]:
    parts = native.split(".")
    index, rest = parts[1], ".".join(parts[2:])
    if parts[0] == "single_blocks":
        block = f"single_transformer_blocks.{index}"
        if rest == "linear1":
            return _split(block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (hidden,) * 3 + (4 * hidden,))
        return [Piece(f"{block}.proj_out", 0, hidden)]
    block = f"transformer_blocks.{index}"
    fused = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    if rest in fused:
        return _split(f"{block}.attn", fused[rest], (hidden,) * 3)
    single = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
              "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
    return [Piece(f"{block}.{single[rest]}", 0, -1)]


def _sd35_pieces(native: str, hidden: int) -> list[Piece]:
    parts = native.split(".")
    block, rest = f"transformer_blocks.{parts[1]}", ".".join(parts[2:])
    fused = {"x_block.attn.qkv": ("attn", ("to_q", "to_k", "to_v")),
             "x_block.attn2.qkv": ("attn2", ("to_q", "to_k", "to_v")),
             "context_block.attn.qkv": ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"))}
    if rest in fused:
        attn, names = fused[rest]
        return _split(f"{block}.{attn}", names, (hidden,) * 3)
    single = {"x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
              "context_block.attn.proj": "attn.to_add_out", "x_block.mlp.fc1": "ff.net.0.proj",
              "x_block.mlp.fc2": "ff.net.2", "context_block.mlp.fc1": "ff_context.net.0.proj",
              "context_block.mlp.fc2": "ff_context.net.2"}
    return [Piece(f"{block}.{single[rest]}", 0, -1)]


def diffusers_pieces(family: DitFamily, native: str, d_out: int) -> list[Piece]:
    """The diffusers modules that train ``native`` (rows == -1: all ``d_out`` rows)."""
    pieces = (_flux_pieces if family is FLUX else _sd35_pieces)(native, family.hidden_size)
    return [Piece(p.diffusers, p.row_start, d_out if p.rows == -1 else p.rows) for p in pieces]


def _pair_keys(fmt: str, module: str) -> tuple[str, str, str | None]:
    """(up key, down key, alpha key or None) of one factor pair."""
    if fmt == "kohya":
        stem = "lora_unet_" + module.replace(".", "_")
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    if fmt == "comfy":
        stem = f"diffusion_model.{module}"
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    if fmt == "peft":
        return f"transformer.{module}.lora_B.weight", f"transformer.{module}.lora_A.weight", None
    if fmt == "diffsynth":
        return f"{module}.lora_B.weight", f"{module}.lora_A.weight", None
    raise ValueError(f"unknown DiT LoRA format {fmt!r}; known: kohya, comfy, peft, diffsynth")


def random_dit_lora(family: DitFamily, fmt: str, *, rank: int = 4, seed: int = 0, alpha: float | None = None,
                    std: float = 0.05, root=None, modules: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A random float32 LoRA for the family's synthetic model in format ``fmt``.

    ``modules`` limits it to some native linears. kohya / comfy: one (d_out, rank) x (rank, d_in) pair per native
    linear (``alpha`` written when given); peft / diffsynth: one pair per diffusers piece, shaped to its band.
    """
    if fmt not in FORMATS[family.name]:
        raise ValueError(f"{family.name} LoRAs come in {FORMATS[family.name]}, not {fmt!r}")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for native, (d_out, d_in) in native_linears(family, root).items():
        if modules is not None and native not in modules:
            continue
        pieces = [Piece(native, 0, d_out)] if fmt in FUSED_FORMATS else diffusers_pieces(family, native, d_out)
        for piece in pieces:
            up_key, down_key, alpha_key = _pair_keys(fmt, piece.diffusers)
            state[up_key] = torch.randn(piece.rows, rank, generator=generator) * std
            state[down_key] = torch.randn(rank, d_in, generator=generator) * std
            if alpha is not None and alpha_key is not None:
                state[alpha_key] = torch.tensor(float(alpha))
    return state


def dense_updates(family: DitFamily, fmt: str, state: dict[str, torch.Tensor], root=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Golden reference for tests only: native weight key -> the dense (d_out, d_in) update ``state`` makes
    at strength 1 (up @ down x alpha / rank, pieces placed on their rows). Tiny models only."""
    out = {}
    for native, (d_out, d_in) in native_linears(family, root).items():
        pieces = [Piece(native, 0, d_out)] if fmt in FUSED_FORMATS else diffusers_pieces(family, native, d_out)
        update, found = torch.zeros(d_out, d_in, dtype=dtype), False
        for piece in pieces:
            up_key, down_key, alpha_key = _pair_keys(fmt, piece.diffusers)
            if up_key not in state:
                continue
            up, down = state[up_key].to(dtype), state[down_key].to(dtype)
            scale = float(state[alpha_key]) / down.shape[0] if alpha_key in state else 1.0
            update[piece.row_start:piece.row_start + piece.rows] += (up @ down) * scale
            found = True
        if found:
            out[f"{native}.weight"] = update
    return out


def write_lora(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
