"""Save node: the merged LoRA as an ordinary kohya .safetensors file in the loras folder."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from .. import hypernet as hypernet_pkg
from ..hypernet.errors import LoraRarError
from ..hypernet.lora_io import SAVE_DTYPES as DTYPES, save_lora
from .common import CATEGORY, MERGED_TYPE



def target_path(name: str) -> Path:
    """The file for ``name`` inside the first loras folder; refuses names that leave that folder."""
    root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    name = name.strip()
    if not name:
        raise LoraRarError("empty file name for the merged LoRA")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    path = (root / name).resolve()
    if os.path.isabs(name) or root not in path.parents:
        raise LoraRarError(f"{name}: the merged LoRA must be saved inside the loras folder {root}")
    return path


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
        "file is never replaced unless 'overwrite' is on; the file is written atomically."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "merged_lora": (MERGED_TYPE, {"tooltip": "From the LoRA.rar Merge node."}),
            "file_name": ("STRING", {"default": "lorarar/merged", "tooltip": "Name inside the loras folder; subfolders allowed, .safetensors added."}),
            "dtype": (list(DTYPES), {"default": "fp16", "tooltip": "Tensor type in the file: fp16 halves the size of fp32."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of the same name. Off: an existing file stops the save with an error."}),
        }}

    def save(self, merged_lora, file_name, dtype, overwrite):
        path = target_path(file_name)
        save_lora(path, merged_lora.kohya_state_dict(DTYPES[dtype]), merged_lora.metadata(hypernet_pkg.__version__), overwrite=overwrite)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}
