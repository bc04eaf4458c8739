"""The CLI's merge of LoRAs of any model family (``--base any``): layers matched by the name written in the file.

The SDXL parser (keys.py) still names the layers it knows, so kohya ``lora_unet_...`` and ComfyUI's
``diffusion_model....`` spellings of one DiT layer pair up; every other stem (a diffusers / PEFT name such as
``transformer.transformer_blocks.0.attn.to_q``) is kept as written. Two layers pair up when their names are
equal; equal names with other shapes are refused by the merge. Only the methods whose formula is per layer and
needs neither a hypernet nor a block table work this way; the ComfyUI node maps layers through ComfyUI's own key
maps instead, so it also pairs two formats of one model (fused qkv against split to_q/to_k/to_v).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import methods
from .base_models import SDXL, UNetLayout
from .checkpoints import load_manifest
from .errors import LoraRarError
from .keys import canonical_name
from .lora_io import LoraFile, read_lora
from .methods import MergeContext, MergeMethod

ANY = "any"


def layout_free_methods() -> tuple[str, ...]:
    """The methods the CLI can run on LoRAs of any family (``MergeMethod.layout_free``), in the registry's order."""
    return tuple(method.name for method in methods.all_methods() if method.layout_free)


def refuse_method(rule: MergeMethod) -> None:
    """Raise unless ``rule`` can merge LoRAs of any family, saying why (the method's own reason for a model it
    does not know) and what to use instead."""
    if rule.layout_free:
        return
    if rule.needs_hypernet:
        published = ", ".join(f"{name} ({info.base_model})" for name, info in load_manifest().items())
        why = (f"it needs a hypernet trained for the LoRAs' model family; the published ones are {published}: "
               f"give --base for those, or train one for this family")
    else:  # a model of no known layout and no named family: what --base any is
        why = rule.unsupported(MergeContext(None, torch.device("cpu"))) or "it needs the base model's layout"
    raise LoraRarError(f"--base {ANY}: method {rule.name} cannot merge LoRAs of any model family ({why}); "
                       f"methods that can: {', '.join(layout_free_methods())}")


def read_for_layout(path: Path, layout: UNetLayout, rule: MergeMethod) -> LoraFile:
    """read_lora(path, layout); a file all of whose layers the parser does not know (a DiT LoRA given to a method
    that needs the layout) is refused saying so, rather than as "not a LoRA"."""
    try:
        return read_lora(path, layout)
    except LoraRarError:
        try:
            unknown = unknown_layers(read_lora(path, layout, keep_unknown=True))
        except LoraRarError:
            unknown = []
        if not unknown:
            raise
    raise LoraRarError(f"{path}: none of its layers is a {layout.name} layer (e.g. {_shown(unknown)}): a LoRA for "
                       f"another model family? {rule.name} needs the base model's layout; use --method "
                       f"{' or '.join(layout_free_methods())} with --base {ANY}") from None


def unknown_layers(lora: LoraFile) -> list[str]:
    """The layers kept under the stem as written, because the SDXL parser has no name for them."""
    return [name for name in lora.layers if canonical_name(name) is None]


def read_pair(subject: Path, style: Path, layout: UNetLayout = SDXL) -> tuple[LoraFile, LoraFile]:
    """Both LoRAs with every layer kept: canonical names where the parser knows the stem, else as written."""
    return read_lora(subject, layout, keep_unknown=True), read_lora(style, layout, keep_unknown=True)


def needs_any(subject: LoraFile, style: LoraFile) -> bool:
    """True when either LoRA holds layers the SDXL parser does not know (the CLI's default then is --base any)."""
    return bool(unknown_layers(subject) or unknown_layers(style))


def _shown(names: list[str]) -> str:
    """The first two names, each on one line and at most 100 characters (file keys are free text)."""
    return ", ".join(" ".join(name.split())[:100] for name in sorted(names)[:2])


def check_shared(subject: LoraFile, style: LoraFile) -> str:
    """Refuse a pair with no layer name in common; else a one-line note of how the layers paired up."""
    shared = subject.layers.keys() & style.layers.keys()
    if not shared:
        raise LoraRarError(
            f"{subject.path} and {style.path} share no layer name (first names: {_shown(list(subject.layers))} | "
            f"{_shown(list(style.layers))}); the CLI matches layers by the name written in the file, so two formats "
            f"of one model (e.g. kohya fused qkv and diffusers to_q/to_k/to_v) do not pair up: merge them with the "
            f"ComfyUI node, which maps both through ComfyUI's key maps, or convert one file to the other's format")
    only_subject, only_style = len(subject.layers) - len(shared), len(style.layers) - len(shared)
    return (f"base {ANY}: layers matched by the names written in the files: {len(shared)} in both, "
            f"{only_subject} only in the subject, {only_style} only in the style")
