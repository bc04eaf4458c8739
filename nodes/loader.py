"""Hypernet loader node: finds, downloads (sha256-checked) and loads the LoRA.rar hypernetwork the merge uses."""

from __future__ import annotations

from .adapter import (CATEGORY, HYPERNET_TYPE, hypernet_changed, hypernet_choices, license_line, load_hypernets,
                      register_folder)

register_folder()


class LoraRarHypernetLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = (HYPERNET_TYPE,)
    RETURN_NAMES = ("hypernet",)
    OUTPUT_TOOLTIPS = ("The LoRA.rar hypernetwork for the merge node (whose report says what a trained file was "
                       "trained for).",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads the LoRA.rar hypernetwork (arXiv 2412.05148). 'auto' picks the published checkpoint that "
        "matches the model (SDXL family or KOALA-700M; connect the model to fetch only that one). Files are "
        "looked up in models/lorarar (and extra_model_paths 'lorarar' entries), then the pack's weights/ folder, "
        "then downloaded once from the pinned upstream URL and checked by sha256. A file trained with "
        "'python -m hypernet train' says what it was trained for (in the merge report) and is refused for a "
        "model of another family or other attention widths. The published hypernets are "
        f"licensed CC BY-NC-SA 4.0 (non-commercial): {license_line()}."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"hypernet": (hypernet_choices(), {
                "default": "auto",
                "tooltip": "auto: the published hypernet matching the MODEL; sdxl / koala-700m: that published "
                           "checkpoint; any other entry: your own checkpoint from models/lorarar.",
            })},
            "optional": {"model": ("MODEL", {
                "tooltip": "Optional: with 'auto', only the hypernet for this model is fetched (without it, every "
                           "published one is)."})},
        }

    @classmethod
    def IS_CHANGED(cls, hypernet="auto", **_):
        return hypernet_changed(hypernet)

    def load(self, hypernet: str, model=None):
        return (load_hypernets(hypernet, model),)
