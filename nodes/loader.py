"""Hypernet loader node: which LoRA.rar hypernetwork the merge uses."""

from __future__ import annotations

from dataclasses import dataclass

import folder_paths

from ..hypernet.checkpoints import load_manifest
from .common import CATEGORY, FOLDER, HYPERNET_TYPE, fingerprint, hypernet_choices, register_folder

register_folder()


@dataclass(frozen=True)
class HypernetChoice:
    """'auto', a published name, or a file in a lorarar folder; resolved by the merge node, which knows the model."""

    choice: str


def _license_line() -> str:
    infos = load_manifest().values()
    return "; ".join(f"{i.name}: {i.license}, {i.attribution}" for i in infos)


class LoraRarHypernetLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = (HYPERNET_TYPE,)
    RETURN_NAMES = ("hypernet",)
    OUTPUT_TOOLTIPS = ("The LoRA.rar hypernetwork for the merge node.",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Chooses the LoRA.rar hypernetwork (arXiv 2412.05148). 'auto' picks the published checkpoint that "
        "matches the model (SDXL family or KOALA-700M). Files are looked up in models/lorarar (and "
        "extra_model_paths 'lorarar' entries), then the pack's weights/ folder, then downloaded once from "
        "the pinned upstream URL and checked by sha256. The published hypernets are licensed "
        f"CC BY-NC-SA 4.0 (non-commercial): {_license_line()}."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hypernet": (hypernet_choices(), {
            "default": "auto",
            "tooltip": "auto: the published hypernet matching the MODEL; sdxl / koala-700m: that published "
                       "checkpoint; any other entry: your own checkpoint from models/lorarar.",
        })}}

    @classmethod
    def IS_CHANGED(cls, hypernet="auto"):
        # an own checkpoint retrained under the same name must not give the cached result
        path = folder_paths.get_full_path(FOLDER, hypernet) if hypernet not in ("auto", *load_manifest()) else None
        return fingerprint(path) if path else hypernet

    def load(self, hypernet: str):
        return (HypernetChoice(hypernet),)
