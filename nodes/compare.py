"""Compare node: one subject LoRA, one style LoRA, one seed, one prompt through every merge method -> a labelled grid.

Each column is merged by the merge node itself (so what is compared is what the merge node gives), its prompt
encoded with that column's CLIP (a merge's text-encoder layers change the conditioning), or the connected
conditioning used as it is (models whose text encoders are not loaded as a CLIP), sampled with ComfyUI's own
sampler and decoded with the VAE. The columns and the grid come from hypernet/comparison.py.
"""

from __future__ import annotations

import time
import weakref

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
import nodes as comfy_nodes  # ComfyUI's own nodes.py (the pack's package is imported relatively)

from ..hypernet import comparison
from ..hypernet import methods as merge_methods  # the node's `methods` input is the selection string
from ..hypernet.comparison import Column
from ..hypernet.errors import LoraRarError
from ..hypernet.merge import LAYER_POLICIES, LAYER_POLICY_HELP
from .common import CATEGORY, HYPERNET_TYPE, model_class, model_layout
from .evaluate import to_image, to_pil
from .merge import LoraRarMerge, param_inputs, params_for


def _column_model(column: str, model, clip, hypernet, subject_lora, style_lora, layer_policy, given) -> tuple:
    """(model, clip, merge report) of one column; LoraRarError when this column cannot run on these inputs."""
    if column == comparison.NO_LORA:
        return model, clip, ""
    method, strengths = column, (1.0, 1.0, 1.0, 1.0)
    if column in (comparison.SUBJECT_ONLY, comparison.STYLE_ONLY):
        # one LoRA alone: the other at strength 0, read and patched exactly as the methods' merges are
        method = comparison.ALONE_METHOD
        strengths = (1.0, 0.0, 1.0, 0.0) if column == comparison.SUBJECT_ONLY else (0.0, 1.0, 0.0, 1.0)
    elif merge_methods.get(column).needs_hypernet and hypernet is None:
        if model_layout(model) is None:  # a DiT: no published hypernet, so the loader would not help either
            raise LoraRarError(f"{column} needs a hypernet trained for {model_class(model)} models (none is published; "
                               "README: 'Other model families')")
        raise LoraRarError(f"{column} needs a hypernet: connect the LoRA.rar Hypernet Loader")
    patched_model, patched_clip, _, report = LoraRarMerge().merge(
        model, hypernet, subject_lora, style_lora, *strengths, method, layer_policy, clip=clip, **given)
    return patched_model, patched_clip, report


class _Encodings:
    """The prompts' conditioning per text encoder. A column whose CLIP has the same weights as one encoded before
    (ComfyUI's own test: same model, same patches, hooks and wrappers) reuses that encoding: the LoRAs without
    text-encoder layers, the baselines, the previous run while the same CLIP stays connected. Every other column
    encodes with its own patched CLIP, so a merge's text-encoder layers shape its conditioning. A few entries,
    holding weak references only (a CLIP no longer used by anything is never kept alive here)."""

    MAX = 4

    def __init__(self):
        self.entries: list[tuple[weakref.ref, tuple, tuple]] = []

    def encode(self, clip, positive: str, negative: str, connected=None) -> tuple:
        """(positive, negative) conditioning of ``clip``; ``connected``: the node's CLIP input, which outlives the
        columns' clones, so an encoding stored under it is found again by the next column and the next run."""
        if connected is not None and connected.patcher.clone_has_same_weights(clip.patcher):
            clip = connected
        texts = (positive, negative, getattr(clip, "layer_idx", None), repr(getattr(clip, "tokenizer_options", None)))
        for patcher_ref, key, conditioning in self.entries:
            patcher = patcher_ref()
            if key == texts and patcher is not None and patcher.clone_has_same_weights(clip.patcher):
                return conditioning
        encode = comfy_nodes.CLIPTextEncode().encode
        encoded = encode(clip, positive)[0]
        conditioning = (encoded, encoded if negative == positive else encode(clip, negative)[0])
        alive = [entry for entry in self.entries if entry[0]() is not None]
        self.entries = [(weakref.ref(clip.patcher), texts, conditioning), *alive][:self.MAX]
        return conditioning


_ENCODINGS = _Encodings()

GIVEN_CONDITIONING_NOTE = ("conditioning: the connected positive/negative conditioning, the same for every column "
                           "(a merge's text-encoder layers cannot change it)")
ENCODED_NOTE = "conditioning: the prompts, encoded per column with that column's CLIP"


def _conditioning_source(clip, positive_conditioning, negative_conditioning) -> str:
    """The report's line on where the conditioning comes from; a one-line LoraRarError when the inputs cannot say."""
    if (positive_conditioning is None) != (negative_conditioning is None):
        given, missing = (("positive", "negative") if negative_conditioning is None else ("negative", "positive"))
        raise LoraRarError(f"compare: {given}_conditioning is connected but {missing}_conditioning is not: connect "
                           "both (used instead of the prompts) or neither (the prompts are encoded with the CLIP)")
    if positive_conditioning is not None:
        return GIVEN_CONDITIONING_NOTE
    if clip is None:
        raise LoraRarError("compare: connect a CLIP to encode the prompts, or connect positive_conditioning and "
                           "negative_conditioning (models whose text encoders are not loaded as a CLIP)")
    return ENCODED_NOTE


def _params_of(column: str, given: dict) -> dict[str, float]:
    """The parameters a method column runs with (its defaults unless set on the node); none for a baseline."""
    if column in comparison.BASELINES:
        return {}
    return merge_methods.resolve_params(merge_methods.get(column), params_for(column, given))


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
        loras = folder_paths.get_filename_list("loras")
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
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "dpmpp_2m", "tooltip": "ComfyUI's sampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "karras", "tooltip": "ComfyUI's scheduler."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Denoising strength."}),
                "methods": ("STRING", {"default": comparison.ALL, "tooltip": f"'all', or a comma-separated list of: {columns}."}),
                "layer_policy": (list(LAYER_POLICIES), {"default": "sum", "tooltip": LAYER_POLICY_HELP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoders; each column encodes the prompts with its own "
                                             "(LoRA-patched) copy. Needed unless both conditioning inputs are connected."}),
                "hypernet": (HYPERNET_TYPE, {"tooltip": "From the LoRA.rar Hypernet Loader; without it the methods that need one become tiles saying so."}),
                **param_inputs(),
                # links, not widgets: at the end so the widgets' positions in saved workflows stay as they were
                "positive_conditioning": ("CONDITIONING", {"tooltip": "Used for every column instead of encoding "
                                          "the prompt (connect both or neither); a merge's text-encoder layers "
                                          "cannot change it."}),
                "negative_conditioning": ("CONDITIONING", {"tooltip": "Used for every column instead of encoding "
                                          "the negative prompt (connect both or neither)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, subject_lora=None, style_lora=None, **_):
        return LoraRarMerge.IS_CHANGED(subject_lora=subject_lora, style_lora=style_lora)

    def compare(self, model, vae, subject_lora, style_lora, positive, negative, latent_image, seed, steps, cfg,
                sampler_name, scheduler, denoise, methods, layer_policy, clip=None, hypernet=None,
                positive_conditioning=None, negative_conditioning=None, **method_params):
        source = _conditioning_source(clip, positive_conditioning, negative_conditioning)
        given = None if positive_conditioning is None else (positive_conditioning, negative_conditioning)
        names = comparison.select_columns(methods)
        columns = [Column(name, _params_of(name, method_params)) for name in names]
        bar = comfy.utils.ProgressBar(len(columns))
        reports, images = [], []
        for done, column in enumerate(columns):
            comfy.model_management.throw_exception_if_processing_interrupted()
            started = time.perf_counter()
            try:
                column_model, column_clip, report = _column_model(column.name, model, clip, hypernet, subject_lora,
                                                                  style_lora, layer_policy, method_params)
            except LoraRarError as error:
                column.failure = str(error)
                reports.append(f"{column.label}: did not run: {error}")
            else:
                conditioning = given or _ENCODINGS.encode(column_clip, positive, negative, clip)
                sampled = self._sample(column_model, vae, conditioning, latent_image, seed, steps, cfg, sampler_name,
                                       scheduler, denoise)
                images.append(sampled)
                column.images = to_pil(sampled)
                reports.append(f"{column.label}: {len(column.images)} image(s) in {time.perf_counter() - started:.1f} s"
                               + ("\n  " + report.replace("\n", "\n  ") if report else ""))
            bar.update_absolute(done + 1, len(columns))
        if not images:
            raise LoraRarError("compare: no method could run on these inputs: "
                               + "; ".join(f"{c.label}: {c.failure}" for c in columns))
        title = f"{subject_lora} + {style_lora}, seed {seed}"
        grid = to_image(comparison.comparison_grid(columns, title))
        batch = torch.cat(images, dim=0)  # the columns share the latent, so their size
        header = (f"LoRA.rar compare: {subject_lora} + {style_lora}; seed {seed}, {steps} steps, cfg {cfg:g}, "
                  f"{sampler_name}/{scheduler}, denoise {denoise:g}, layer policy {layer_policy}; {source}")
        return (grid, batch, "\n".join(comparison.labels_for_images(columns)), "\n".join([header, *reports]))

    @staticmethod
    def _sample(model, vae, conditioning, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise):
        """One column: ComfyUI's KSampler on (positive, negative) conditioning, the VAE's decode."""
        (latent,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, *conditioning,
                                                latent_image, denoise=denoise)
        return comfy_nodes.VAEDecode().decode(vae, latent)[0]
