"""The LoRA.rar hypernetwork: per input column, two merge coefficients from a subject/style update pair.

Architecture of the published checkpoints (parameter names kept so they load unchanged):
``input_<k>``: Linear(2 * width_k -> hidden), one per attention width the network serves
(input_1: width 640, input_2: width 1280 for SDXL / KOALA-700M), then ``output`` = ReLU,
Linear(hidden -> 2). No output activation: coefficients are unbounded.

A trained network is written as .safetensors by ``save_hypernet`` with metadata saying what it was trained for
(``lorarar_model_classes``, ``lorarar_widths``, ``lorarar_pairs``, ``lorarar_recipe``, ``lorarar_steps``,
``lorarar_pack_version``, ``lorarar_base_model``, ``lorarar_unet_layout``; all strings); ``hypernet_metadata`` reads
them back parsed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .base_models import UNetLayout
from .errors import LoraRarError
from .files import SAFETENSORS_SUFFIXES, atomic_file, check_name_characters, file_sha256, read_state_dict

PUBLISHED_HIDDEN = 128  # hidden units of the published SDXL and KOALA-700M checkpoints

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
        # what the file's metadata says about its training (hypernet_metadata); {} for .pth files
        self.training_metadata: dict = {}

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
        if path.suffix in SAFETENSORS_SUFFIXES:
            net.training_metadata = hypernet_metadata(path)
            net.model_classes = net.training_metadata[MODEL_CLASSES_KEY]
            said = net.training_metadata[WIDTHS_KEY]
            if said is not None and tuple(said) != tuple(sorted(net.widths)):
                raise LoraRarError(f"{path}: metadata {WIDTHS_KEY} says widths {_shown_widths(said)} but the tensors "
                                   f"serve {_shown_widths(net.widths)}; the file was altered: train or save it again")
        return net

    def check_fits(self, name: str, family: str, attention_widths: set[int] | None) -> None:
        """Refuse a model this network was not trained for: another ComfyUI model class than its metadata names,
        or attention widths it has no input layer for (``attention_widths`` None: not a UNet, not checked)."""
        if self.model_classes and family not in self.model_classes:
            raise LoraRarError(f"{name}: this hypernet was trained for {shown_model_classes(self.model_classes)} "
                               f"models; this model is {family}: choose a hypernet trained for {family}")
        lacking = sorted(set(attention_widths or ()) - set(self.widths))
        if lacking:
            raise LoraRarError(f"{name}: this hypernet has input layers for attention widths "
                               f"{_shown_widths(self.widths)}; this {family} model has attention widths "
                               f"{_shown_widths(attention_widths)} (none for {_shown_widths(lacking)}): choose a "
                               f"hypernet trained for {family}")

    def describe(self, name: str) -> str:
        """One line saying what the network was trained for, bounded in length whatever its metadata holds."""
        return f"{name}: {describe_training(self.training_metadata, self.widths)}"


MODEL_CLASSES_KEY = "lorarar_model_classes"  # safetensors metadata: comma-separated ComfyUI model classes, "Flux,FluxSchnell"
WIDTHS_KEY = "lorarar_widths"  # "320,640,1280": the attention widths of the input layers, ascending
PAIRS_KEY = "lorarar_pairs"  # JSON list of "subject+style" names trained on
RECIPE_KEY = "lorarar_recipe"  # JSON object of the training settings
STEPS_KEY = "lorarar_steps"  # optimiser steps run, a decimal integer
PACK_VERSION_KEY = "lorarar_pack_version"
BASE_MODEL_KEY = "lorarar_base_model"  # the base checkpoint's file name
# JSON of the base model's UNet layout (UNetLayout.as_dict): how the LoRAs it merges name their layers, for the CLI,
# which has no model to read it from
LAYOUT_KEY = "lorarar_unet_layout"
TRAINING_KEYS = (MODEL_CLASSES_KEY, WIDTHS_KEY, PAIRS_KEY, RECIPE_KEY, STEPS_KEY, PACK_VERSION_KEY, BASE_MODEL_KEY,
                 LAYOUT_KEY)
UNREADABLE = "unreadable"  # hypernet_metadata: the training keys present whose value did not parse
# A pair list or recipe longer than this is not parsed (a file's header may be up to 100 MB of metadata)
_MAX_JSON_CHARS = 1 << 20
_SHOWN_CHARS = 40


def new_hypernet(widths, hidden: int = PUBLISHED_HIDDEN, seed: int = 0) -> LoraRarHypernet:
    """A freshly initialised network for attention ``widths`` (input_1 serves the smallest width), trainable.

    ``seed`` fixes the initialisation (torch's default Linear init drawn from its own generator, so the global
    RNG is left alone): the same widths, hidden size and seed give the same tensors.
    """
    widths = sorted({int(w) for w in widths})
    if not widths or widths[0] < 1:
        raise LoraRarError(f"hypernet widths {widths}: expected one or more positive attention widths")
    inputs = {f"input_{k}": 2 * width for k, width in enumerate(widths, start=1)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LoraRarHypernet(inputs, hidden=hidden)
    return net.train()


def save_hypernet(net: LoraRarHypernet, path: str | Path, metadata: dict, *, overwrite: bool = False) -> Path:
    """Write ``net`` as .safetensors (float32) with its training metadata, atomically; returns the path.

    ``metadata`` maps ``lorarar_*`` keys to values: model classes as a string or list of names, pairs as a list
    of "subject+style" names, the recipe as a dict, steps as an int, the rest as strings (already-encoded
    strings are accepted and checked). ``lorarar_widths`` is always written from the network itself and
    ``lorarar_pack_version`` defaults to this pack's version. Refuses NaN/Inf tensors, a value that would not
    read back, and an existing file unless ``overwrite``.
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraRarError(f"{path}: a hypernet is saved as .safetensors; name the file <name>.safetensors")
    tensors = {}
    for key, tensor in net.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(tensor).all():
            raise LoraRarError(f"{path}: hypernet tensor {key} holds NaN or Inf values; not saved (lower the "
                               f"learning rate or resume from the last checkpoint)")
        tensors[key] = tensor
    text = {PACK_VERSION_KEY: __version__}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.startswith("lorarar_"):
            raise LoraRarError(f"{path}: metadata key {str(key)[:_SHOWN_CHARS]!r} is not a lorarar_* key")
        if value is not None:
            text[key] = _encoded(path, key, value)
    said = text.pop(WIDTHS_KEY, None)
    text[WIDTHS_KEY] = ",".join(str(w) for w in sorted(net.widths))
    if said is not None and said != text[WIDTHS_KEY]:
        raise LoraRarError(f"{path}: metadata {WIDTHS_KEY} {said[:_SHOWN_CHARS]} does not match the network's "
                           f"input layers ({text[WIDTHS_KEY]}); leave it out, it is written from the network")
    unreadable = _parsed(text)[UNREADABLE]
    if unreadable:
        raise LoraRarError(f"{path}: metadata {', '.join(unreadable)} would not read back; see "
                           f"hypernet.model.save_hypernet for the expected types")
    with atomic_file(path, overwrite=overwrite) as temp:
        save_file(tensors, str(temp), metadata=text)
    return path


def _encoded(path: Path, key: str, value) -> str:
    """A metadata value as the string stored in the file."""
    if isinstance(value, str):
        return value
    if key == MODEL_CLASSES_KEY and isinstance(value, (list, tuple)):
        bad = next((name for name in value if not isinstance(name, str) or not name.strip() or "," in name), None)
        if bad is not None or not value:
            raise LoraRarError(f"{path}: metadata {key}: {str(bad)[:_SHOWN_CHARS]!r} is not a ComfyUI model class "
                               f"name (expected names such as 'SD15', without commas)")
        return ",".join(name.strip() for name in value)
    if key == WIDTHS_KEY and isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    if key in (PAIRS_KEY, RECIPE_KEY) and isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise LoraRarError(f"{path}: metadata {key} is not JSON-serialisable ({exc})") from None
    if key == STEPS_KEY and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == LAYOUT_KEY and isinstance(value, (UNetLayout, dict)):
        return json.dumps(value.as_dict() if isinstance(value, UNetLayout) else value, sort_keys=True)
    raise LoraRarError(f"{path}: metadata {key} is a {type(value).__name__}; expected a string"
                       + {STEPS_KEY: " or an int", PAIRS_KEY: " or a list of names", RECIPE_KEY: " or a dict",
                          MODEL_CLASSES_KEY: " or a list of names", LAYOUT_KEY: " or a UNetLayout (or its as_dict())"}.get(key, ""))


def hypernet_metadata(path: str | Path) -> dict:
    """What a .safetensors hypernet's metadata says about its training, parsed.

    Returns every key of TRAINING_KEYS: model classes (tuple of str, () when not said), widths (tuple of int),
    pairs (list of str), recipe (dict), steps (int), pack version and base model (str), UNet layout (UNetLayout);
    None when absent or
    when the value does not parse, such keys listed under ``"unreadable"``. Values are the file's, unbounded:
    show them through ``describe_training``. A file without metadata gives all None.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a bad header; the user needs one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LoraRarError(f"{path}: cannot read the hypernet file's metadata ({reason})") from None
    return _parsed(text)


def _parsed(text: dict[str, str]) -> dict:
    out: dict = {key: None for key in TRAINING_KEYS}
    out[MODEL_CLASSES_KEY] = tuple(name.strip() for name in text.get(MODEL_CLASSES_KEY, "").split(",") if name.strip())
    unreadable = []
    for key, parse in ((WIDTHS_KEY, _widths), (PAIRS_KEY, _pairs), (RECIPE_KEY, _recipe), (STEPS_KEY, _steps),
                       (PACK_VERSION_KEY, _line), (BASE_MODEL_KEY, _line), (LAYOUT_KEY, _layout)):
        if key not in text:
            continue
        try:
            out[key] = parse(text[key])
        except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
            unreadable.append(key)
    out[UNREADABLE] = tuple(unreadable)
    return out


def _widths(value: str) -> tuple[int, ...]:
    widths = tuple(int(part) for part in value.split(","))
    if len(value) > 1000 or list(widths) != sorted(set(widths)) or widths[0] < 1:
        raise ValueError("widths must be ascending positive integers")
    return widths


def _json(value: str, kind: type):
    if len(value) > _MAX_JSON_CHARS:
        raise ValueError("too long to parse")
    parsed = json.loads(value)
    if not isinstance(parsed, kind):
        raise TypeError(f"expected a JSON {kind.__name__}")
    return parsed


def _pairs(value: str) -> list[str]:
    pairs = _json(value, list)
    if not all(isinstance(pair, str) for pair in pairs):
        raise TypeError("pairs must be names")
    return pairs


def _recipe(value: str) -> dict:
    return _json(value, dict)


def _layout(value: str) -> UNetLayout:
    return UNetLayout.from_dict(_json(value, dict))


def _steps(value: str) -> int:
    if not value.isdigit() or len(value) > 18:  # isdigit: no sign, no spaces; 18 digits fit an int64
        raise ValueError("steps must be a non-negative integer")
    return int(value)


def _line(value: str) -> str:
    if len(value) > 4096:
        raise ValueError("expected one short line")
    check_name_characters(value)  # no line breaks, no control or invisible characters
    return value


def _printable(text: str) -> str:
    """Free text from a file with whitespace collapsed and control or invisible characters dropped."""
    return "".join(c for c in " ".join(text.split()) if c.isprintable())


def _shown(text: str) -> str:
    """Free text from a file, for a message: printable, at most _SHOWN_CHARS characters."""
    text = _printable(text[:10 * _SHOWN_CHARS])
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def _shown_widths(widths) -> str:
    widths = sorted(widths)
    return ", ".join(str(w) for w in widths[:8]) + (f" and {len(widths) - 8} more" if len(widths) > 8 else "")


def shown_model_classes(classes: tuple[str, ...]) -> str:
    """The model classes a hypernet's metadata names, for a message: the first three, each at most 40 characters
    (the metadata is free text a file can make megabytes long)."""
    # a name of invisible characters only is shown escaped: dropped, the message read "trained for  models"
    shown = ", ".join(_printable(name[:10 * _SHOWN_CHARS])[:_SHOWN_CHARS] or ascii(name[:_SHOWN_CHARS // 4])
                      for name in classes[:3])
    return shown + (f" and {len(classes) - 3} more" if len(classes) > 3 else "")


def describe_training(training: dict, widths) -> str:
    """What a hypernet was trained for, in one line of bounded length (metadata is free text from strangers)."""
    parts = [f"attention widths {_shown_widths(widths)}"]
    if all(training.get(key) in (None, ()) for key in (*TRAINING_KEYS, UNREADABLE)):
        return "no training metadata (a published or hand-made checkpoint); " + parts[0]
    classes = training.get(MODEL_CLASSES_KEY)
    head = f"trained for {shown_model_classes(classes)} models" if classes else "trained for an unnamed model family"
    if training.get(BASE_MODEL_KEY):
        head += f" through {_shown(training[BASE_MODEL_KEY])}"
    if training.get(PAIRS_KEY) is not None:
        parts.append(f"{len(training[PAIRS_KEY])} pairs")
    if training.get(STEPS_KEY) is not None:
        parts.append(f"{training[STEPS_KEY]} steps")
    if training.get(PACK_VERSION_KEY):
        parts.append(f"LoRA.rar {_shown(training[PACK_VERSION_KEY])}")
    if training.get(UNREADABLE):
        parts.append(f"unreadable metadata: {', '.join(training[UNREADABLE])}")
    return f"{head}; " + ", ".join(parts)


def model_classes_of(path: Path) -> tuple[str, ...]:
    """The model classes a .safetensors hypernet's metadata names (``lorarar_model_classes``); () for others."""
    return hypernet_metadata(path)[MODEL_CLASSES_KEY] if Path(path).suffix in SAFETENSORS_SUFFIXES else ()
