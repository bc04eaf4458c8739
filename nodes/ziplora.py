"""ZipLoRA node: the merge coefficients of one subject/style LoRA pair optimised through ComfyUI's own model
(ZipLoRA, arXiv 2311.13600; nodes/adapter/ziplora.py runs it), for pairs the published hypernetwork does not serve."""

from __future__ import annotations

from ..hypernet.methods.zip_lora import LEARNING_RATE, SIMILARITY_LAMBDA, STEPS, STOP_SIMILARITY
from .adapter import CATEGORY, MERGED_TYPE, Settings, lora_names, loras_changed, optimise_for_model, param_input


class LoraRarZipLora:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", MERGED_TYPE, "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "merged_lora", "report", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The model with the optimised merged LoRA applied.",
        "The CLIP through the same patching (ZipLoRA merges the diffusion model's layers only, so none of its weights change).",
        "The optimised merged LoRA (rank r_subject + r_style per layer), for the save node and the coefficient picture.",
        "Loss terms at start and end on a fixed batch, steps run, time, whether it stopped early, layers applied.",
        "The loss and the similarity term per step.",
    )
    FUNCTION = "optimise"
    DESCRIPTION = (
        "ZipLoRA (arXiv 2311.13600): optimises, for one subject LoRA and one style LoRA, a subject and a style "
        "coefficient per input column of every layer both patch, so the merged model reproduces the subject LoRA "
        "on the subject images and the style LoRA on the style images while the two coefficient vectors become "
        "orthogonal. Runs through ComfyUI's own model (minutes per pair on a GPU); for pairs the published "
        "LoRA.rar hypernetwork does not serve. Cancel with ComfyUI's interrupt."
    )

    @classmethod
    def INPUT_TYPES(cls):
        loras = lora_names()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the merge is optimised through (SDXL family, or any model whose LoRA layers are linear or 1x1 conv)."}),
                "clip": ("CLIP", {"tooltip": "Encodes the two prompts."}),
                "vae": ("VAE", {"tooltip": "Encodes the reference images into latents."}),
                "subject_lora": (loras, {"tooltip": "The subject (content) LoRA."}),
                "style_lora": (loras, {"tooltip": "The style LoRA."}),
                "subject_images": ("IMAGE", {"tooltip": "Reference images of the subject (a batch); one is drawn per step."}),
                "subject_prompt": ("STRING", {"multiline": True, "default": "A photo of sks dog",
                                              "tooltip": "The subject LoRA's prompt for its images."}),
                "style_images": ("IMAGE", {"tooltip": "The style image(s); one is drawn per step."}),
                "style_prompt": ("STRING", {"multiline": True, "default": "A painting in watercolor painting style",
                                            "tooltip": "The style LoRA's prompt for its images."}),
                # defaults, ranges and tooltips: the registered method zip-lora's parameters (one source)
                "steps": ("INT", {"default": int(STEPS.default), "min": int(STEPS.minimum), "max": int(STEPS.maximum),
                                  "tooltip": STEPS.help}),
                "learning_rate": param_input(LEARNING_RATE, round=False),
                "similarity_lambda": param_input(SIMILARITY_LAMBDA, round=False),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seeds the images, noise and timesteps drawn per step (the same for the merged branch and its targets)."}),
                "stop_similarity": param_input(STOP_SIMILARITY, round=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        return loras_changed(subject_lora, style_lora)

    def optimise(self, model, clip, vae, subject_lora, style_lora, subject_images, subject_prompt, style_images,
                 style_prompt, steps, learning_rate, similarity_lambda, seed, stop_similarity, unique_id=None):
        settings = Settings(int(steps), float(learning_rate), float(similarity_lambda), int(seed), float(stop_similarity))
        return optimise_for_model(model, clip, vae, subject_lora, style_lora, (subject_images, subject_prompt),
                                  (style_images, style_prompt), settings, unique_id)
