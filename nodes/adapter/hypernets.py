"""Hypernet files in ComfyUI: the models/lorarar folder (and extra_model_paths entries), then the pack's weights/,
then the pinned download; loaded once and kept (a few MB each); the one the merge uses for a given model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import folder_paths

from ...hypernet.base_models import UNetLayout
from ...hypernet.cache import BoundedCache
from ...hypernet.checkpoints import WEIGHTS_DIR, ResolvedHypernet, for_model_class, load_manifest, resolve_hypernet
from ...hypernet.errors import LoraRarError
from ...hypernet.files import file_sha256
from ...hypernet.model import LoraRarHypernet
from .model import model_class, model_layout

FOLDER = "lorarar"
HYPERNET_EXTENSIONS = {".pth", ".pt", ".safetensors"}


def register_folder() -> None:
    """models/lorarar as a model folder (extra_model_paths.yaml entries named ``lorarar`` are kept)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(HYPERNET_EXTENSIONS))


def hypernet_dirs() -> list[Path]:
    """Where hypernet files are looked for: ComfyUI's lorarar folders, then the pack's weights/."""
    return [*(Path(p) for p in folder_paths.get_folder_paths(FOLDER)), WEIGHTS_DIR]


def download_dir() -> Path:
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def hypernet_choices() -> list[str]:
    published = {info.file for info in load_manifest().values()}
    own = [f for f in folder_paths.get_filename_list(FOLDER) if os.path.basename(f) not in published]
    return ["auto", *load_manifest(), *own]


# Loaded hypernets by published name, or by (file name, content sha256) for own files: a file retrained under
# the old name is loaded again. Each is about 2 MB; four covers both published ones and two own files.
_LOADED: BoundedCache = BoundedCache(4, "published name, or own file's name and sha256")


@dataclass(frozen=True)
class LoadedHypernets:
    """What the loader resolved: the chosen hypernet, or for 'auto' the published ones (all of them, or the one
    serving the connected model); the merge takes the one for its model. name -> ResolvedHypernet."""

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


def license_line() -> str:
    return "; ".join(f"{i.name}: {i.license}, {i.attribution}" for i in load_manifest().values())


def _load(name: str) -> ResolvedHypernet:
    published = name in load_manifest()
    source = name if published else folder_paths.get_full_path_or_raise(FOLDER, name)
    key = name if published else (name, file_sha256(source))
    # the resolver the command line uses too: one answer to what a hypernet serves
    resolved, _ = _LOADED.get_or_make(key, lambda: resolve_hypernet(source, hypernet_dirs(), download_dir()))
    return resolved


def load_hypernets(choice: str, model=None) -> LoadedHypernets:
    """The loader node's output for ``choice`` ('auto', a published name, or an own file in models/lorarar)."""
    if choice == "auto" and model is not None and not any(
            model_class(model) in info.comfy_model_classes for info in load_manifest().values()):
        return LoadedHypernets(choice)  # the merge says why, per method: direct and friends still run
    if choice == "auto":
        names = [for_model_class(model_class(model)).name] if model is not None else list(load_manifest())
    else:
        names = [choice]
    return LoadedHypernets(choice, {name: _load(name) for name in names})


def hypernet_changed(choice: str) -> str:
    """IS_CHANGED of the loader: an own checkpoint retrained under the same name must not give the cached result."""
    path = folder_paths.get_full_path(FOLDER, choice) if choice not in ("auto", *load_manifest()) else None
    return file_sha256(path) if path else choice
