"""Save node: the merged LoRA as a kohya-format .safetensors in the loras folder (nodes/adapter/outputs.py)."""

from __future__ import annotations

from .adapter import CATEGORY, IF_EXISTS, MERGED_TYPE, SAVE_DTYPES, save_merged


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
            "dtype": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": "Tensor type in the file: fp16 halves the size of fp32."}),
            "if_exists": (list(IF_EXISTS), {"default": "add number", "tooltip": "When the file exists: add number = save as name_00001, name_00002, ... (like Save Image); error = stop with an error; overwrite = replace it."}),
        }}

    def save(self, merged_lora, file_name, dtype, if_exists):
        path = save_merged(merged_lora, file_name, dtype, if_exists)
        return {"ui": {"text": [path]}, "result": (path,)}
