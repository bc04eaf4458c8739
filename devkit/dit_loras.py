"""Random LoRAs for the synthetic DiT models (devkit/synthetic_dit.py), in the file formats trainers write.

Each family has one table from its native (ComfyUI / released-file) linears to the diffusers modules that
train them (``_DIFFUSERS_BLOCKS``). Where the native model fuses projections, diffusers keeps them apart and a
LoRA file then holds one factor pair per piece, each updating a band of the fused weight's output rows:

    Flux double block   img_attn.qkv  <- attn.to_q | attn.to_k | attn.to_v                (hidden rows each)
                        txt_attn.qkv  <- attn.add_q_proj | add_k_proj | add_v_proj
    Flux single block   linear1       <- attn.to_q | attn.to_k | attn.to_v | proj_mlp    (hidden x3, then 4 hidden)
    Flux.2 double block as Flux (MLPs: ff.linear_in / linear_out); single block linear1 <- attn.to_qkv_mlp_proj
                        and linear2 <- attn.to_out, whole (diffusers' Flux.2 fuses them too)
    SD3.5 joint block   x_block.attn.qkv, x_block.attn2.qkv  <- attn(2).to_q | to_k | to_v
                        context_block.attn.qkv               <- attn.add_q_proj | add_k_proj | add_v_proj
    Z-Image block       attention.qkv <- attention.to_q | to_k | to_v (3840 rows each), in the main layers and
                        both refiners; attention.out <- attention.to_out.0
    Krea 2 block        attn.wq / wk / wv / gate / wo <- attn.to_q / to_k / to_v / to_gate / to_out.0 (no fusion)
    Qwen-Image block    the native names are diffusers' (attn.to_q ... to_add_out, img_mlp.net.0.proj ...)
    Wan                 none: ComfyUI reads Wan LoRAs in the generic forms only

Formats (``FORMATS[family]``, ``KEY_FORMS`` spells them):
    kohya       ``lora_unet_<native with _>.lora_up/.lora_down/.alpha``: one pair per native (fused) linear
    comfy       ``diffusion_model.<native>.lora_up/.lora_down/.alpha``: ComfyUI's generic form, one pair per linear
    peft        ``transformer.<diffusers>.lora_B/.lora_A.weight``: split pieces (diffusers, AI-Toolkit, PEFT trainers)
    diffsynth   ``<diffusers>.lora_B/.lora_A.weight`` with no prefix (DiffSynth-Studio)
    lycoris     ``lycoris_<diffusers with _>.lora_up/.lora_down/.alpha`` (SimpleTuner's LyCORIS LoRA)
    onetrainer  ``lora_transformer_<diffusers with _>.lora_up/.lora_down/.alpha`` (OneTrainer)

``FORMATS_BY_HOST`` lists the formats each host's comfy.lora.model_lora_keys_unet maps in full
(tests/host/test_synthetic_dit.py checks both tables against each host).

Only safetensors and torch are needed (shapes come from the model file's header).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.synthetic_dit import DitFamily

_ALL = ("kohya", "comfy", "peft", "diffsynth", "lycoris", "onetrainer")
FORMATS = {
    "flux": _ALL, "flux2": _ALL,
    "sd35": ("kohya", "comfy", "peft", "lycoris", "onetrainer"),  # ComfyUI's SD3 map has no bare diffusers names
    "krea2": _ALL[:5], "zimage": _ALL[:5], "qwen_image": _ALL[:5],  # no lora_transformer_ outside Flux and SD3
    "wan21": ("kohya", "comfy"), "wan22": ("kohya", "comfy"),
}
FORMATS_BY_HOST = {
    "0.33.0": FORMATS,
    # 0.3.75 reads no bare diffusers names for Flux, and only diffusion_model.<diffusers> and lycoris_ for Z-Image;
    # it has no Krea2. Its Flux.2 map lacks the MLP and single-block names: see PARTIAL_BY_HOST.
    "0.3.75": {**FORMATS, "flux": ("kohya", "comfy", "peft", "lycoris", "onetrainer"), "flux2": ("kohya", "comfy"),
               "zimage": ("kohya", "comfy", "lycoris"), "krea2": ()},
}
# Formats a host maps only in part: (host, family) -> {format: regex of the native linears it does map}. The
# rest of such a file is dropped silently, which is what users report as "the LoRA does nothing".
PARTIAL_BY_HOST = {
    ("0.3.75", "flux2"): dict.fromkeys(("peft", "lycoris", "onetrainer"),
                                       re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)\.weight$")),
}


@dataclass(frozen=True)
class KeyForm:
    """How one format spells a factor pair: ``<prefix><module>.<up>.weight``, ``.<down>.weight``, ``.alpha``.

    ``split``: one pair per diffusers piece (module = the diffusers name), else one per native linear.
    ``underscores``: the module path written with ``_`` for ``.`` (kohya style). ``alpha``: the format stores one.
    """

    prefix: str
    split: bool
    underscores: bool
    up: str = "lora_up"
    down: str = "lora_down"
    alpha: bool = True


KEY_FORMS = {
    "kohya": KeyForm("lora_unet_", split=False, underscores=True),
    "comfy": KeyForm("diffusion_model.", split=False, underscores=False),
    "peft": KeyForm("transformer.", split=True, underscores=False, up="lora_B", down="lora_A", alpha=False),
    "diffsynth": KeyForm("", split=True, underscores=False, up="lora_B", down="lora_A", alpha=False),
    "lycoris": KeyForm("lycoris_", split=True, underscores=True),
    "onetrainer": KeyForm("lora_transformer_", split=True, underscores=True),
}
FUSED_FORMATS = tuple(name for name, form in KEY_FORMS.items() if not form.split)  # one pair per native linear

# Native linears a LoRA trains: attention and MLP, not the modulation (adaLN) layers, embedders or final layer.
_FLUX_TARGETS = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                           r"|single_blocks\.\d+\.linear[12])\.weight$")
_TARGETS = {
    "flux": _FLUX_TARGETS, "flux2": _FLUX_TARGETS,
    "sd35": re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc[12])\.weight$"),
    "krea2": re.compile(r"^blocks\.\d+\.(attn\.(wq|wk|wv|gate|wo)|mlp\.(gate|up|down))\.weight$"),
    "zimage": re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
                         r"\.weight$"),
    "qwen_image": re.compile(r"^transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
                             r"|(img|txt)_mlp\.net\.(0\.proj|2))\.weight$"),
    "wan21": re.compile(r"^blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight$"),
}
_TARGETS["wan22"] = _TARGETS["wan21"]

# Native name inside a block -> the diffusers module training it whole, or its bands ((module, rows / hidden), ...).
_FLUX_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_FLUX_SINGLE = {"linear1": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4)),
                "linear2": "proj_out"}
_FLUX2_DOUBLE = {**_FLUX_DOUBLE, "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
                 "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
_FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_SD35_JOINT = {
    "x_block.attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "x_block.attn2.qkv": (("attn2.to_q", 1), ("attn2.to_k", 1), ("attn2.to_v", 1)),
    "context_block.attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
    "x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
    "context_block.attn.proj": "attn.to_add_out", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
}
_KREA2_BLOCK = {"attn.wq": "attn.to_q", "attn.wk": "attn.to_k", "attn.wv": "attn.to_v", "attn.gate": "attn.to_gate",
                "attn.wo": "attn.to_out.0", "mlp.gate": "ff.gate", "mlp.up": "ff.up", "mlp.down": "ff.down"}
_ZIMAGE_BLOCK = {
    "attention.qkv": (("attention.to_q", 1), ("attention.to_k", 1), ("attention.to_v", 1)),
    "attention.out": "attention.to_out.0",
    "feed_forward.w1": "feed_forward.w1", "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
}
# family -> native block list -> (diffusers block list, table; None: the native names are diffusers' already)
_DIFFUSERS_BLOCKS = {
    "flux": {"double_blocks": ("transformer_blocks", _FLUX_DOUBLE),
             "single_blocks": ("single_transformer_blocks", _FLUX_SINGLE)},
    "flux2": {"double_blocks": ("transformer_blocks", _FLUX2_DOUBLE),
              "single_blocks": ("single_transformer_blocks", _FLUX2_SINGLE)},
    "sd35": {"joint_blocks": ("transformer_blocks", _SD35_JOINT)},
    "krea2": {"blocks": ("transformer_blocks", _KREA2_BLOCK)},
    "zimage": {name: (name, _ZIMAGE_BLOCK) for name in ("layers", "noise_refiner", "context_refiner")},
    "qwen_image": {"transformer_blocks": ("transformer_blocks", None)},
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


def diffusers_pieces(family: DitFamily, native: str, d_out: int) -> list[Piece]:
    """The diffusers modules that train ``native`` (a linear of ``d_out`` rows), each with its band of rows."""
    if family.name not in _DIFFUSERS_BLOCKS:
        raise ValueError(f"{family.name} has no diffusers names (ComfyUI reads its LoRAs in {FORMATS[family.name]})")
    block, index, inner = native.split(".", 2)
    diffusers_block, table = _DIFFUSERS_BLOCKS[family.name][block]
    prefix = f"{diffusers_block}.{index}"
    entry = inner if table is None else table[inner]
    if isinstance(entry, str):
        return [Piece(f"{prefix}.{entry}", 0, d_out)]
    pieces, start = [], 0
    for name, units in entry:
        pieces.append(Piece(f"{prefix}.{name}", start, units * family.hidden_size))
        start += units * family.hidden_size
    if start != d_out:
        raise ValueError(f"{family.name} {native}: the diffusers bands cover {start} of its {d_out} rows")
    return pieces


def _pieces(family: DitFamily, fmt: str, native: str, d_out: int) -> list[Piece]:
    """The factor pairs format ``fmt`` writes for ``native``: itself whole, or its diffusers pieces."""
    return diffusers_pieces(family, native, d_out) if KEY_FORMS[fmt].split else [Piece(native, 0, d_out)]


def _pair_keys(fmt: str, module: str) -> tuple[str, str, str | None]:
    """(up key, down key, alpha key or None) of one factor pair."""
    if fmt not in KEY_FORMS:
        raise ValueError(f"unknown DiT LoRA format {fmt!r}; known: {', '.join(KEY_FORMS)}")
    form = KEY_FORMS[fmt]
    stem = form.prefix + (module.replace(".", "_") if form.underscores else module)
    return f"{stem}.{form.up}.weight", f"{stem}.{form.down}.weight", f"{stem}.alpha" if form.alpha else None


def random_dit_lora(family: DitFamily, fmt: str, *, rank: int = 4, seed: int = 0, alpha: float | None = None,
                    std: float = 0.05, root=None, modules: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A random float32 LoRA for the family's synthetic model in format ``fmt``.

    ``modules`` limits it to some native linears. Fused formats (kohya, comfy): one (d_out, rank) x (rank, d_in)
    pair per native linear; split ones: one pair per diffusers piece, shaped to its band. ``alpha`` is written
    when given and the format stores one (peft and diffsynth files do not).
    """
    if fmt not in FORMATS[family.name]:
        raise ValueError(f"{family.name} LoRAs come in {FORMATS[family.name]}, not {fmt!r}")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for native, (d_out, d_in) in native_linears(family, root).items():
        if modules is not None and native not in modules:
            continue
        for piece in _pieces(family, fmt, native, d_out):
            up_key, down_key, alpha_key = _pair_keys(fmt, piece.diffusers)
            state[up_key] = torch.randn(piece.rows, rank, generator=generator) * std
            state[down_key] = torch.randn(rank, d_in, generator=generator) * std
            if alpha is not None and alpha_key is not None:
                state[alpha_key] = torch.tensor(float(alpha))
    return state


def dense_updates(family: DitFamily, fmt: str, state: dict[str, torch.Tensor], root=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Golden reference for tests only: native weight key -> the dense (d_out, d_in) update ``state`` makes
    at strength 1 (up @ down x alpha / rank, pieces placed on their rows), for the linears it trains.

    Written from the piece tables above, never from ComfyUI's key map. Tiny models, or few trained linears."""
    out = {}
    for native, (d_out, d_in) in native_linears(family, root).items():
        update = None
        for piece in _pieces(family, fmt, native, d_out):
            up_key, down_key, alpha_key = _pair_keys(fmt, piece.diffusers)
            if up_key not in state:
                continue
            up, down = state[up_key].to(dtype), state[down_key].to(dtype)
            scale = float(state[alpha_key]) / down.shape[0] if alpha_key in state else 1.0
            if update is None:  # allocated only for trained linears: a 3840-wide model's are 59 M numbers each
                update = torch.zeros(d_out, d_in, dtype=dtype)
            update[piece.row_start:piece.row_start + piece.rows].addmm_(up, down, alpha=scale)  # no temporaries
        if update is not None:
            out[f"{native}.weight"] = update
    return out


def write_lora(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
