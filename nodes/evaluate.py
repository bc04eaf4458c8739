"""Evaluation node: the paper's MLLM judge protocol (and optional CLIP-I) over a batch of generated images."""

from __future__ import annotations

import json

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from PIL import Image

from ..hypernet import evaluation
from ..hypernet.errors import LoraRarError
from ..hypernet.evaluation import (DEFAULT_API_KEY_ENV, MAX_RETRIES, MAX_TIMEOUT_S, PINNED_URL_ENV, ChatCompletionsJudge,
                                   JudgeCancelled)
from .common import CATEGORY


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) floats in [0, 1] -> B RGB PIL images."""
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    pixels = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(frame, "RGB") for frame in pixels]


def to_image(picture: Image.Image) -> torch.Tensor:
    """One RGB PIL image -> ComfyUI IMAGE (1, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def clip_i(clip_vision, generated: torch.Tensor, *reference_sets: torch.Tensor) -> list[list[float]]:
    """Per reference set, per generated image: mean cosine similarity of ComfyUI CLIP vision image embeddings."""
    def embed(images):
        return clip_vision.encode_image(images)["image_embeds"]

    embeds = embed(generated)
    return [evaluation.mean_cosine(embeds, embed(references)).tolist() for references in reference_sets]


class LoraRarEvaluate:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("subject_score", "style_score", "overall_score", "table", "grid", "ranking")
    OUTPUT_TOOLTIPS = (
        "Fraction (0-1) of images whose subject the judge approved (yes on strictly more than half of the subject references).",
        "Fraction (0-1) of images the judge found in the named style (yes on strictly more than half of the style references).",
        "Fraction (0-1) of images approved for both subject and style: the paper's headline number.",
        "JSON: scores, unparsed answers, CLIP-I when connected, and per image every verdict and raw answer.",
        "The generated images (at most 512 px) with their verdicts drawn on them; green border: both approved.",
        "With labels connected: the labels (methods) ranked by both %, then subject %, then style %; else per image.",
    )
    OUTPUT_NODE = True
    FUNCTION = "evaluate"
    DESCRIPTION = (
        "Asks a multimodal judge (any OpenAI-compatible chat-completions server that accepts images: Ollama, vLLM, "
        "LM Studio, llama.cpp) the LoRA.rar paper's yes/no questions: for every generated image and subject reference, "
        "'same subject?'; for every style reference, 'in this style?'. Images are sent at most 512 px, decoding is greedy, "
        "and an image passes when strictly more than half of the answers are yes. The API key is read at run time from "
        "the named environment variable (LORARAR_* only) and never stored in the workflow; it is sent only to the judge "
        f"URLs the server's operator listed in ${PINNED_URL_ENV} (or, with none listed, to a loopback judge), never "
        "over plain http to another host, and never echoed. Each request has one deadline and a size cap; Cancel "
        "stops it within a second. Optional CLIP-I similarities "
        "with a CLIP vision model."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images to judge (a batch)."}),
                "subject_references": ("IMAGE", {"tooltip": "Photos of the subject (a batch); one subject question per generated image and reference."}),
                "style_references": ("IMAGE", {"tooltip": "Examples of the style (a batch); one style question per generated image and reference."}),
                "style_name": ("STRING", {"default": "watercolor painting", "tooltip": "The style's name as the judge should read it, e.g. 'watercolor painting', '3d rendering'."}),
                "judge_url": ("STRING", {"default": "http://127.0.0.1:11434/v1", "tooltip": "Base URL of an OpenAI-compatible chat-completions server that accepts images (Ollama: http://127.0.0.1:11434/v1)."}),
                "judge_model": ("STRING", {"default": "llava-critic", "tooltip": "Model name on that server; the paper used LLaVA-Critic-7B."}),
                "api_key_env": ("STRING", {"default": DEFAULT_API_KEY_ENV, "tooltip": "NAME of the environment variable that holds the API key, starting with LORARAR_ (not the key itself; local servers need none). The key never enters the workflow and is sent only to the judge URLs in the server's $LORARAR_JUDGE_URL, or to 127.0.0.1/localhost when that is unset."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional CLIP vision model (Load CLIP Vision) for CLIP-I: cosine similarity to the subject and style references, reported in the table."}),
                "timeout_s": ("FLOAT", {"default": 120.0, "min": 1.0, "max": MAX_TIMEOUT_S, "step": 1.0, "tooltip": "Seconds allowed for each request in all (connect, headers and the whole answer) before retrying."}),
                "retries": ("INT", {"default": 3, "min": 0, "max": MAX_RETRIES, "tooltip": "Extra attempts on server errors (5xx), timeouts and refused connections, waiting 1, 2, 4 ... s between them."}),
                "labels": ("STRING", {"forceInput": True, "tooltip": "One label per image, one per line (the LoRA.rar Compare node's labels): the ranking output and the table rank the labels by both %, subject %, style %."}),
            },
        }

    @staticmethod
    def _ask_all(judge, generated, subject_refs, style_refs, style_name) -> list:
        bar = comfy.utils.ProgressBar(evaluation.question_count(len(generated), len(subject_refs), len(style_refs)))
        try:
            return [evaluation.judge_image(judge, f"#{index}", picture, subject_refs, style_refs, style_name,
                                         before_question=comfy.model_management.throw_exception_if_processing_interrupted,
                                         after_question=lambda: bar.update(1))
                    for index, picture in enumerate(generated)]
        except JudgeCancelled:
            pass  # outside the except block: ComfyUI's interrupt exception should not chain to ours
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException()

    def evaluate(self, images, subject_references, style_references, style_name, judge_url, judge_model,
                 api_key_env, clip_vision=None, timeout_s=120.0, retries=3, labels=None):
        if not style_name.strip():
            raise LoraRarError("style_name is empty: name the style, e.g. 'watercolor painting'")
        # Cancel is polled during each request and each wait between retries, not only between questions
        judge = ChatCompletionsJudge(judge_url, judge_model, api_key_env, timeout=timeout_s, retries=retries,
                                     cancelled=comfy.model_management.processing_interrupted)
        names = evaluation.parse_labels(labels, len(images)) if labels is not None else None  # before any question
        generated = [evaluation.resize_long_side(p) for p in to_pil(images)]
        subject_refs = [evaluation.resize_long_side(p) for p in to_pil(subject_references)]
        style_refs = [evaluation.resize_long_side(p) for p in to_pil(style_references)]
        results = self._ask_all(judge, generated, subject_refs, style_refs, style_name.strip())
        if clip_vision is not None:
            for result, subject_sim, style_sim in zip(results, *clip_i(clip_vision, images, subject_references, style_references)):
                result.clip_i_subject, result.clip_i_style = subject_sim, style_sim
        total = evaluation.score("batch", results)
        table = {
            "judge": {"endpoint": judge.endpoint, "model": judge.model},
            "style_name": style_name.strip(),
            "subject_references": len(subject_refs), "style_references": len(style_refs),
            "subject_score": total.subject, "style_score": total.style, "overall_score": total.both,
            "unparsed": total.unparsed, "clip_i_subject": total.clip_i_subject, "clip_i_style": total.clip_i_style,
            "images": [{"index": i, **r.as_dict()} for i, r in enumerate(results)],
        }
        ranked = evaluation.rank(names or [f"#{i}" for i in range(len(results))], results)
        if names is not None:
            table["ranking"] = evaluation.ranking_rows(ranked)
            for row, name in zip(table["images"], names):
                row["label"] = name
        picture = evaluation.grid([evaluation.annotate(p, r) for p, r in zip(generated, results)])
        summary = (f"subject {100 * total.subject:.0f}%, style {100 * total.style:.0f}%, both {100 * total.both:.0f}% "
                   f"of {total.images} images" + (f"; {total.unparsed} unparsed answers" if total.unparsed else ""))
        ranking = evaluation.format_ranking(ranked)
        return {"ui": {"text": [summary] + ([ranking] if names is not None else [])},
                "result": (total.subject, total.style, total.both, json.dumps(table, indent=1), to_image(picture),
                           ranking)}
