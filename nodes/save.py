"""Save node: the merged LoRA as an ordinary kohya .safetensors file in the loras folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths

from .. import hypernet as hypernet_pkg
from ..hypernet.errors import LoraRarError, LoraRarFileExists
from ..hypernet.files import check_name_characters, check_target
from ..hypernet.lora_io import SAVE_DTYPES as DTYPES, save_lora
from .common import CATEGORY, MERGED_TYPE



IF_EXISTS = ("add number", "error", "overwrite")


def target_path(name: str, check: bool = True) -> Path:
    """The file for ``name`` inside the first loras folder; refuses names that leave that folder, names with
    control characters, no file name (``folder/``, ``.``, ``..``) and names too long for the file system.

    The check is lexical (no symlink resolution), so subfolders the user linked into loras stay usable.
    """
    check_name_characters(name)  # before strip(): a trailing newline is refused, not quietly dropped
    root = Path(os.path.abspath(folder_paths.get_folder_paths("loras")[0]))
    name = name.strip()
    stem = name.removesuffix(".safetensors")
    if not re.split(r"[\\/]", stem)[-1].strip(" ."):
        raise LoraRarError(f"{name or repr(name)}: no file name for the merged LoRA; give a name such as lorarar/merged")
    name = stem + ".safetensors"
    path = Path(os.path.normpath(root / name))
    if os.path.isabs(name) or root not in path.parents:
        raise LoraRarError(f"{name}: the merged LoRA must be saved inside the loras folder {root}")
    return check_target(path) if check else path


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}_{number:05d}.safetensors")


class LoraRarSaveMergedLora:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file written.",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    DESCRIPTION = (
        "Saves the merged LoRA as a kohya-format .safetensors in the loras folder, with metadata naming the "
        "source LoRAs and hypernet (sha256), method and strengths. Any LoRA loader can load it. An existing "
        "file is never replaced unless 'if_exists' says overwrite; the file is written atomically."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "merged_lora": (MERGED_TYPE, {"tooltip": "From the LoRA.rar Merge node."}),
            "file_name": ("STRING", {"default": "lorarar/merged", "tooltip": "Name inside the loras folder; subfolders allowed, .safetensors added."}),
            "dtype": (list(DTYPES), {"default": "fp16", "tooltip": "Tensor type in the file: fp16 halves the size of fp32."}),
            "if_exists": (list(IF_EXISTS), {"default": "add number", "tooltip": "When the file exists: add number = save as name_00001, name_00002, ... (like Save Image); error = stop with an error; overwrite = replace it."}),
        }}

    def save(self, merged_lora, file_name, dtype, if_exists):
        merged_lora.check_savable()  # a sampling-time merge (k-lora) is no single file: say so before any name check
        if if_exists not in IF_EXISTS:
            raise LoraRarError(f"if_exists must be one of {', '.join(IF_EXISTS)}, not {if_exists!r}")
        # with "add number" a folder may hold the name (the next number is taken): each candidate is checked
        path = target_path(file_name, check=if_exists != "add number")
        if if_exists == "add number":  # the longest numbered name must fit too, not only the first one
            check_target(_numbered(path, 99_999))
        state_dict = merged_lora.kohya_state_dict(DTYPES[dtype])
        metadata = merged_lora.metadata(hypernet_pkg.__version__)
        candidates = [path] if if_exists != "add number" else [path, *(_numbered(path, n) for n in range(1, 100_000))]
        for candidate in candidates:
            if if_exists == "add number" and os.path.lexists(candidate):  # a file, folder or link: next number
                continue
            try:
                save_lora(candidate, state_dict, metadata, overwrite=if_exists == "overwrite",
                          protect=merged_lora.source_paths)
            except LoraRarFileExists:
                if if_exists != "add number":
                    raise
                continue  # appeared meanwhile: take the next number
            return {"ui": {"text": [str(candidate)]}, "result": (str(candidate),)}
        raise LoraRarError(f"{path}: no free numbered name left beside it")
