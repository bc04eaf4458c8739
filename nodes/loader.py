"""Hypernet loader node: finds, downloads (sha256-checked) and loads the LoRA.rar hypernetwork the merge uses."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import folder_paths

from ..hypernet.base_models import UNetLayout
from ..hypernet.checkpoints import ResolvedHypernet, for_model_class, load_manifest, resolve_hypernet
from ..hypernet.errors import LoraRarError
from ..hypernet.model import LoraRarHypernet
from .common import (CATEGORY, FOLDER, HYPERNET_TYPE, download_dir, fingerprint, hypernet_choices, hypernet_dirs,
                     model_class, model_layout, register_folder)

register_folder()

# Loaded hypernets by published name, or by (file name, content sha256) for own files: a file retrained under
# the old name is loaded again. Each is about 2 MB; four covers both published ones and two own files.
_LOADED: "OrderedDict[object, ResolvedHypernet]" = OrderedDict()
_LOADED_MAX = 4


@dataclass(frozen=True)
class LoadedHypernets:
    """What the loader resolved: the chosen hypernet, or for 'auto' the published ones (all of them, or the one
    serving the connected model); the merge node takes the one for its model. name -> ResolvedHypernet."""

    choice: str
    by_name: dict = field(default_factory=dict, compare=False)

    def for_model(self, model) -> tuple[LoraRarHypernet, UNetLayout | None, str]:
        """(hypernet, its training layout, its name) for ``model``; 'auto' picks by the manifest's model classes."""
        name = for_model_class(model_class(model)).name if self.choice == "auto" else self.choice
        if name not in self.by_name:
            raise LoraRarError(f"the Hypernet Loader resolved {', '.join(self.by_name)} for another model than this "
                               f"{model_class(model)} one; connect this model to the loader or choose a hypernet")
        resolved = self.by_name[name]
        resolved.net.check_fits(name, model_class(model), attention_widths(model))
        return resolved.net, resolved.layout, name


def attention_widths(model) -> set[int] | None:
    """The widths of a UNet model's attention layers (SD 1.5: 320, 640, 1280); None for models that are no UNet."""
    layout = model_layout(model)
    return None if layout is None else {width for _, width, _ in layout.attention_blocks()}


def _license_line() -> str:
    infos = load_manifest().values()
    return "; ".join(f"{i.name}: {i.license}, {i.attribution}" for i in infos)


def _load(name: str) -> ResolvedHypernet:
    published = name in load_manifest()
    source = name if published else folder_paths.get_full_path_or_raise(FOLDER, name)
    key = name if published else (name, fingerprint(source))
    if key not in _LOADED:  # the resolver the command line uses too: one answer to what a hypernet serves
        _LOADED[key] = resolve_hypernet(source, hypernet_dirs(), download_dir())
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return _LOADED[key]


def _published_for(model) -> bool:
    return any(model_class(model) in info.comfy_model_classes for info in load_manifest().values())


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
        f"licensed CC BY-NC-SA 4.0 (non-commercial): {_license_line()}."
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
        # an own checkpoint retrained under the same name must not give the cached result
        path = folder_paths.get_full_path(FOLDER, hypernet) if hypernet not in ("auto", *load_manifest()) else None
        return fingerprint(path) if path else hypernet

    def load(self, hypernet: str, model=None):
        if hypernet == "auto" and model is not None and not _published_for(model):
            return (LoadedHypernets(hypernet),)  # the merge says why, per method: direct and friends still run
        if hypernet == "auto":
            names = [for_model_class(model_class(model)).name] if model is not None else list(load_manifest())
        else:
            names = [hypernet]
        return (LoadedHypernets(hypernet, {name: _load(name) for name in names}),)
