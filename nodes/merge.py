"""Merge node: two LoRA files + the hypernet -> one merged low-rank LoRA patched onto MODEL and CLIP."""

from __future__ import annotations

from ..hypernet import methods
from ..hypernet.merge import LAYER_POLICIES, LAYER_POLICY_HELP, Strengths
from .adapter import (CATEGORY, HYPERNET_TYPE, MERGED_TYPE, MergeRequest, calibration_inputs, lora_names, loras_changed,
                      merge_for_model, method_param_inputs, params_for, strength_input)


class LoraRarMerge:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", MERGED_TYPE, "STRING")
    RETURN_NAMES = ("model", "clip", "merged_lora", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the merged LoRA applied.",
        "The CLIP with the merged LoRA's text-encoder layers applied (None when no CLIP was connected).",
        "The merged LoRA, for the save node.",
        "What happened to every layer: merged by the hypernetwork, summed, kept or skipped, and why.",
    )
    FUNCTION = "merge"
    DESCRIPTION = (
        "LoRA.rar: merges a subject LoRA and a style LoRA with a pretrained hypernetwork that predicts, per "
        "column of each attention update, how much of the subject and of the style to keep (arXiv 2412.05148). "
        "The result is one ordinary low-rank LoRA patched onto the model through ComfyUI's own LoRA patching. "
        "Method 'direct' adds the two LoRAs (what two stacked LoRA loaders do)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        loras = lora_names()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the merged LoRA to: SDXL family, KOALA-700M, Flux, SD3.5, ... (lorarar and b-lora serve only some families; the error says which)."}),
                "hypernet": (HYPERNET_TYPE, {"tooltip": "From the LoRA.rar Hypernet Loader node."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA: your dog, your character."}),
                "style_lora": (loras, {"tooltip": "The style LoRA: watercolour, 3D render, ..."}),
                "subject_strength": strength_input("Scales the subject's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "style_strength": strength_input("Scales the style's share of the merged update in the diffusion model (1 = as the hypernet predicts)."),
                "subject_clip_strength": strength_input("Scales the subject LoRA's text-encoder layers."),
                "style_clip_strength": strength_input("Scales the style LoRA's text-encoder layers."),
                "method": (list(methods.names()), {"default": "lorarar", "tooltip": "; ".join(
                    f"{method.name}: {method.help}" for method in methods.all_methods())}),
                "layer_policy": (list(LAYER_POLICIES), {"default": "sum", "tooltip": LAYER_POLICY_HELP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoders, for LoRAs that also train them. Leave empty to patch the model only."}),
                **method_param_inputs(),
                **calibration_inputs(),
            },
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        return loras_changed(subject_lora, style_lora)  # the files' content, not only their names

    def merge(self, model, hypernet, subject_lora, style_lora, subject_strength, style_strength,
              subject_clip_strength, style_clip_strength, method, layer_policy, clip=None, subject_conditioning=None,
              style_conditioning=None, **method_params):
        strengths = Strengths(subject_strength, style_strength, subject_clip_strength, style_clip_strength)
        request = MergeRequest(subject_lora, style_lora, method, layer_policy, strengths, params_for(method, method_params))
        conditioning = {"subject": subject_conditioning, "style": style_conditioning}
        return merge_for_model(model, clip, hypernet, request, conditioning)
