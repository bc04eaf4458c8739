"""Glue shared by the nodes: ComfyUI folders, file fingerprints, the model's layout."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..hypernet.base_models import UNetLayout
from ..hypernet.checkpoints import WEIGHTS_DIR, load_manifest
from ..hypernet.files import file_sha256

CATEGORY = "LoRA.rar"
HYPERNET_TYPE = "LORARAR_HYPERNET"
MERGED_TYPE = "LORARAR_MERGED_LORA"
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


def fingerprint(path: str) -> str:
    """sha256 of a file's content (remembered by hypernet.files.file_sha256 while the file's stat is unchanged)."""
    return file_sha256(path)


def model_class(model) -> str:
    return type(model.model.model_config).__name__


def model_layout(model) -> UNetLayout | None:
    """The model's UNet layout; None for models that are no SDXL-style UNet (Flux, SD3, ...): their layers are
    matched through ComfyUI's key map alone, and the methods that need a UNet layout say so by family."""
    config = model.model.model_config.unet_config
    try:
        return UNetLayout.from_unet_config(model_class(model), config)
    except (KeyError, TypeError):
        return None
