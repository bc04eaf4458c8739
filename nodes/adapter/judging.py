"""The paper's MLLM-judge evaluation on ComfyUI IMAGE batches: every generated image asked against the subject and
style references (hypernet/evaluation), with ComfyUI's progress and Cancel, optional CLIP-I, a table and a ranking."""

from __future__ import annotations

import json
from dataclasses import dataclass

import comfy.model_management
import comfy.utils
import torch

from ...hypernet.errors import LoraRarError
from ...hypernet.evaluation.judge import ChatCompletionsJudge, JudgeCancelled
from ...hypernet.evaluation.pictures import annotate, grid
from ...hypernet.evaluation.protocol import judge_image, mean_cosine, question_count, resize_long_side, score
from ...hypernet.evaluation.ranking import format_ranking, parse_labels, rank, ranking_rows
from .sampling import to_image, to_pil


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how long to wait: the key itself is read at run time from ``api_key_env``."""

    url: str
    model: str
    api_key_env: str
    timeout_s: float = 120.0
    retries: int = 3


def clip_i(clip_vision, generated: torch.Tensor, *reference_sets: torch.Tensor) -> list[list[float]]:
    """Per reference set, per generated image: mean cosine similarity of ComfyUI CLIP vision image embeddings."""
    def embed(images):
        return clip_vision.encode_image(images)["image_embeds"]

    embeds = embed(generated)
    return [mean_cosine(embeds, embed(references)).tolist() for references in reference_sets]


def _ask_all(judge, generated, subject_refs, style_refs, style_name) -> list:
    bar = comfy.utils.ProgressBar(question_count(len(generated), len(subject_refs), len(style_refs)))
    try:
        return [judge_image(judge, f"#{index}", picture, subject_refs, style_refs, style_name,
                            before_question=comfy.model_management.throw_exception_if_processing_interrupted,
                            after_question=lambda: bar.update(1))
                for index, picture in enumerate(generated)]
    except JudgeCancelled:
        pass  # outside the except block: ComfyUI's interrupt exception should not chain to ours
    comfy.model_management.throw_exception_if_processing_interrupted()
    raise comfy.model_management.InterruptProcessingException()


def evaluate_images(images, subject_references, style_references, style_name: str, settings: "JudgeSettings",
                    clip_vision=None, labels: str | None = None) -> dict:
    """The Evaluate node's {"ui", "result"}: every image judged against the references, scored and ranked."""
    if not style_name.strip():
        raise LoraRarError("style_name is empty: name the style, e.g. 'watercolor painting'")
    # Cancel is polled during each request and each wait between retries, not only between questions
    judge = ChatCompletionsJudge(settings.url, settings.model, settings.api_key_env, timeout=settings.timeout_s,
                                 retries=settings.retries, cancelled=comfy.model_management.processing_interrupted)
    names = parse_labels(labels, len(images)) if labels is not None else None  # before any question
    generated = [resize_long_side(p) for p in to_pil(images)]
    subject_refs = [resize_long_side(p) for p in to_pil(subject_references)]
    style_refs = [resize_long_side(p) for p in to_pil(style_references)]
    results = _ask_all(judge, generated, subject_refs, style_refs, style_name.strip())
    if clip_vision is not None:
        for result, subject_sim, style_sim in zip(results, *clip_i(clip_vision, images, subject_references, style_references)):
            result.clip_i_subject, result.clip_i_style = subject_sim, style_sim
    total = score("batch", results)
    table = {
        "judge": {"endpoint": judge.endpoint, "model": judge.model},
        "style_name": style_name.strip(),
        "subject_references": len(subject_refs), "style_references": len(style_refs),
        "subject_score": total.subject, "style_score": total.style, "overall_score": total.both,
        "unparsed": total.unparsed, "clip_i_subject": total.clip_i_subject, "clip_i_style": total.clip_i_style,
        "images": [{"index": i, **r.as_dict()} for i, r in enumerate(results)],
    }
    ranked = rank(names or [f"#{i}" for i in range(len(results))], results)
    if names is not None:
        table["ranking"] = ranking_rows(ranked)
        for row, name in zip(table["images"], names):
            row["label"] = name
    picture = grid([annotate(p, r) for p, r in zip(generated, results)])
    summary = (f"subject {100 * total.subject:.0f}%, style {100 * total.style:.0f}%, both {100 * total.both:.0f}% "
               f"of {total.images} images" + (f"; {total.unparsed} unparsed answers" if total.unparsed else ""))
    ranking = format_ranking(ranked)
    return {"ui": {"text": [summary] + ([ranking] if names is not None else [])},
            "result": (total.subject, total.style, total.both, json.dumps(table, indent=1), to_image(picture),
                       ranking)}
