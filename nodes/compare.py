"""Compare node: one subject LoRA, one style LoRA, one seed, one prompt through every merge method -> a labelled
grid (nodes/adapter/merging.py runs it)."""

from __future__ import annotations

from ..hypernet import comparison
from ..hypernet.merge import LAYER_POLICIES, LAYER_POLICY_HELP
from .adapter import (CATEGORY, GRID_PROMPT_FALLBACK, HYPERNET_TYPE, Sampling, calibration_inputs, compare, lora_names,
                      loras_changed, method_param_inputs, sampler_input, scheduler_input)


class LoraRarCompare:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("grid", "images", "labels", "report")
    OUTPUT_TOOLTIPS = (
        "One labelled tile per method and baseline; a method that cannot run on these inputs is a grey tile saying why.",
        "The images of the methods that ran, in the grid's order (one per latent in the batch), for the Evaluate node.",
        "One label per image (method and its parameters), one per line: connect to the Evaluate node's labels to rank the methods.",
        "Per column: ran or why not, and each merge's report.",
    )
    FUNCTION = "compare"
    DESCRIPTION = (
        "Samples one subject LoRA + one style LoRA through every merge method (LoRA.rar, direct sum, NP-LoRA, "
        "B-LoRA, ...) and the baselines (no LoRA, each LoRA alone) with the same seed and prompt, and lays the "
        "results out in one labelled grid. The prompt is encoded per column with that column's CLIP, since a "
        "merge also changes the text encoders. Feed images and labels into the Evaluate node to rank the "
        "methods by the paper's judge protocol."
    )

    @classmethod
    def INPUT_TYPES(cls):
        loras = lora_names()
        columns = ", ".join(comparison.available_columns())
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model: SDXL family, or a DiT (SD3.5, Flux, ...) where each method supports it."}),
                "vae": ("VAE", {"tooltip": "Decodes each column's latent."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA."}),
                "style_lora": (loras, {"tooltip": "The style LoRA."}),
                "positive": ("STRING", {"multiline": True, "default": "A photo of sks dog in watercolor painting style",
                                        "tooltip": "The prompt, encoded per column with that column's CLIP "
                                                   "(unused when positive_conditioning is connected)."}),
                "negative": ("STRING", {"multiline": True, "default": "low quality, blurry, deformed",
                                        "tooltip": "The negative prompt, encoded per column with that column's CLIP "
                                                   "(unused when negative_conditioning is connected)."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to sample from (e.g. Empty Latent Image); every column starts from the same noise."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "One seed for every column."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": "Sampling steps per column."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": sampler_input("ComfyUI's sampler."),
                "scheduler": scheduler_input("ComfyUI's scheduler."),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Denoising strength."}),
                "methods": ("STRING", {"default": comparison.ALL, "tooltip": f"'all', or a comma-separated list of: {columns}."}),
                "layer_policy": (list(LAYER_POLICIES), {"default": "sum", "tooltip": LAYER_POLICY_HELP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoders; each column encodes the prompts with its own "
                                             "(LoRA-patched) copy. Needed unless both conditioning inputs are connected."}),
                "hypernet": (HYPERNET_TYPE, {"tooltip": "From the LoRA.rar Hypernet Loader; without it the methods that need one become tiles saying so."}),
                **method_param_inputs(),
                # links, not widgets: at the end so the widgets' positions in saved workflows stay as they were
                "positive_conditioning": ("CONDITIONING", {"tooltip": "Used for every column instead of encoding "
                                          "the prompt (connect both or neither); a merge's text-encoder layers "
                                          "cannot change it."}),
                "negative_conditioning": ("CONDITIONING", {"tooltip": "Used for every column instead of encoding "
                                          "the negative prompt (connect both or neither)."}),
                **calibration_inputs(GRID_PROMPT_FALLBACK),
            },
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        return loras_changed(subject_lora, style_lora)

    def compare(self, model, vae, subject_lora, style_lora, positive, negative, latent_image, seed, steps, cfg,
                sampler_name, scheduler, denoise, methods, layer_policy, clip=None, hypernet=None,
                positive_conditioning=None, negative_conditioning=None, subject_conditioning=None,
                style_conditioning=None, **method_params):
        given = None if positive_conditioning is None and negative_conditioning is None else (
            positive_conditioning, negative_conditioning)
        sampling = Sampling(latent_image, seed, steps, cfg, sampler_name, scheduler, denoise)
        own = {"subject": subject_conditioning, "style": style_conditioning}
        return compare(model, vae, clip, hypernet, subject_lora, style_lora, (positive, negative), given, sampling,
                       methods, layer_policy, method_params, own)
