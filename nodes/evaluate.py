"""Evaluation node: the paper's MLLM judge protocol (and optional CLIP-I) over a batch of generated images
(nodes/adapter/judging.py runs it)."""

from __future__ import annotations

from ..hypernet.evaluation.judge import DEFAULT_API_KEY_ENV, MAX_RETRIES, MAX_TIMEOUT_S, PINNED_URL_ENV
from .adapter import CATEGORY, JudgeSettings, evaluate_images


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

    def evaluate(self, images, subject_references, style_references, style_name, judge_url, judge_model,
                 api_key_env, clip_vision=None, timeout_s=120.0, retries=3, labels=None):
        judge = JudgeSettings(judge_url, judge_model, api_key_env, timeout_s, retries)
        return evaluate_images(images, subject_references, style_references, style_name, judge, clip_vision, labels)
