"""The paper's MLLM evaluation protocol (arXiv 2412.05148, MARS2) and CLIP-I: questions, votes, scores.

Per generated image: one yes/no question per subject reference ("same subject? colour and details
matter, style may differ") and one per style reference ("in the named style? ignore the subject"),
images resized to at most 512 px on the long side, greedy decoding. An answer containing the word
"yes" is yes, else one containing "no" is no, else it is *unparsed* (recorded and reported, and not
an approval). Subject (style) passes when the yes fraction over its references is strictly above
0.5; an image is correct when both pass. Scores are averaged per pair, then over pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from ..errors import LoraRarError
from .judge import ANSWER_CHARS, Judge, UnreadableAnswer

MAX_SIDE = 512
MAX_REFERENCES = 10_000  # per image and kind, in a saved vote: far above any real set of reference images

SUBJECT_QUESTION = (
    "The first picture is a generated test image; the second is a reference photo of a particular subject. "
    "Does the test image show this same subject? The subject's colours and fine details must match the "
    "reference; the artistic style, pose and background may differ. Answer with yes or no only."
)


def style_question(style_name: str) -> str:
    """The style question for ``style_name`` (e.g. "watercolor painting")."""
    return (
        f"The first picture is a generated test image; the second is an example of the {style_name} style. "
        f"Is the test image rendered in the {style_name} style? Judge only the style and ignore what the "
        "subject is. Answer with yes or no only."
    )


# ------------------------------------------------------------------ answers and votes

_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


def parse_answer(text: str) -> str:
    """'yes', 'no' or 'unparsed'. A "yes" anywhere wins (the paper's rule); whole words only.

    Anything but a string (a judge's JSON object, a number) is unparsed: ``str({"yes": 1})`` must not approve;
    so is an :class:`UnreadableAnswer` (a reply with no answer in it), whatever its words.
    """
    if not isinstance(text, str) or isinstance(text, UnreadableAnswer):
        return "unparsed"
    if _YES.search(text):
        return "yes"
    if _NO.search(text):
        return "no"
    return "unparsed"


@dataclass
class Vote:
    """The answers for one image over one set of references (one verdict per reference)."""

    verdicts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # raw text, kept for unparsed ones

    def add(self, answer: str) -> None:
        self.verdicts.append(parse_answer(answer))
        self.answers.append(answer)

    def count(self, verdict: str) -> int:
        return self.verdicts.count(verdict)

    @property
    def fraction(self) -> float:
        """Yes answers over all references asked (unparsed counts as not approving)."""
        return self.count("yes") / len(self.verdicts) if self.verdicts else 0.0

    @property
    def passed(self) -> bool:
        return majority(self.verdicts)

    def as_dict(self) -> dict:
        return {"yes": self.count("yes"), "no": self.count("no"), "unparsed": self.count("unparsed"),
                "fraction": round(self.fraction, 6), "pass": self.passed,
                "verdicts": list(self.verdicts), "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vote":
        """The vote saved by :meth:`as_dict`; ValueError when ``data`` has another shape (or sizes it never has)."""
        verdicts, answers = data["verdicts"], data.get("answers", [""] * len(data["verdicts"]))
        if not (isinstance(verdicts, list) and 0 < len(verdicts) <= MAX_REFERENCES
                and all(isinstance(v, str) and v in ("yes", "no", "unparsed") for v in verdicts)
                and isinstance(answers, list) and len(answers) == len(verdicts)
                and all(isinstance(a, str) and len(a) <= ANSWER_CHARS for a in answers)):
            raise ValueError("not a saved vote")
        return cls(list(verdicts), list(answers))


def majority(verdicts: Sequence[str]) -> bool:
    """True when strictly more than half of ``verdicts`` are 'yes' (2 of 4 fails, 2 of 3 passes)."""
    if not verdicts:
        raise LoraRarError("majority vote over no answers: give at least one reference image")
    return sum(v == "yes" for v in verdicts) * 2 > len(verdicts)


@dataclass
class ImageResult:
    """Everything asked about one generated image; CLIP-I values are cosine similarities in [-1, 1]."""

    name: str
    subject: Vote
    style: Vote
    clip_i_subject: float | None = None
    clip_i_style: float | None = None

    @property
    def both(self) -> bool:
        return self.subject.passed and self.style.passed

    @property
    def unparsed(self) -> int:
        return self.subject.count("unparsed") + self.style.count("unparsed")

    def as_dict(self) -> dict:
        data = {"image": self.name, "subject": self.subject.as_dict(), "style": self.style.as_dict(),
                "both": self.both, "unparsed": self.unparsed}
        if self.clip_i_subject is not None:
            data["clip_i_subject"] = round(self.clip_i_subject, 6)
        if self.clip_i_style is not None:
            data["clip_i_style"] = round(self.clip_i_style, 6)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ImageResult":
        """The result saved by :meth:`as_dict`; ValueError when ``data`` has another shape.

        CLIP-I values must be finite cosines (a little rounding slack around [-1, 1]): a saved 1e400 or
        10**400 would otherwise overflow the means, NaN would be written back as non-standard JSON.
        """
        clip = [data.get("clip_i_subject"), data.get("clip_i_style")]
        if not (isinstance(data["image"], str) and 0 < len(data["image"]) <= 1024
                and all(c is None or (type(c) in (int, float) and -1.001 <= c <= 1.001) for c in clip)):
            raise ValueError("not a saved image result")
        clip = [None if c is None else float(c) for c in clip]
        return cls(data["image"], Vote.from_dict(data["subject"]), Vote.from_dict(data["style"]), *clip)


# ------------------------------------------------------------------ asking

def resize_long_side(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB copy with the long side at most ``max_side`` px (aspect kept; never enlarged)."""
    image = image.convert("RGB")
    long_side = max(image.size)
    if long_side <= max_side:
        return image
    scale = max_side / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def question_count(images: int, subject_refs: int, style_refs: int) -> int:
    return images * (subject_refs + style_refs)


def judge_image(judge: Judge, name: str, image: Image.Image, subject_refs: Sequence[Image.Image],
                style_refs: Sequence[Image.Image], style_name: str,
                before_question: Callable[[], None] | None = None,
                after_question: Callable[[], None] | None = None) -> ImageResult:
    """Ask every question about one image (inputs already resized). ``before_question`` may raise to
    cancel; ``after_question`` is called once per answer (progress)."""
    if not subject_refs or not style_refs:
        raise LoraRarError(f"{name}: need at least one subject reference and one style reference image")
    result = ImageResult(name, Vote(), Vote())
    asks = [(result.subject, SUBJECT_QUESTION, ref) for ref in subject_refs]
    asks += [(result.style, style_question(style_name), ref) for ref in style_refs]
    for vote, question, reference in asks:
        if before_question:
            before_question()
        vote.add(judge.ask(question, [image, reference]))
        if after_question:
            after_question()
    return result


def mean_cosine(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I: (B, D) and (R, D) embeddings -> (B,) mean cosine similarity to the R references."""
    generated = torch.nn.functional.normalize(generated.float().flatten(1), dim=-1)
    references = torch.nn.functional.normalize(references.float().flatten(1), dim=-1)
    return (generated @ references.T).mean(dim=1)


# ------------------------------------------------------------------ aggregation

@dataclass
class Score:
    """Fractions (0..1) of images passing subject, style and both; ``images`` counted."""

    name: str
    images: int
    subject: float
    style: float
    both: float
    unparsed: int = 0
    clip_i_subject: float | None = None
    clip_i_style: float | None = None

    def as_dict(self) -> dict:
        data = {"name": self.name, "images": self.images, "subject": round(self.subject, 6),
                "style": round(self.style, 6), "both": round(self.both, 6), "unparsed": self.unparsed}
        for key in ("clip_i_subject", "clip_i_style"):
            if getattr(self, key) is not None:
                data[key] = round(getattr(self, key), 6)
        return data


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def score(name: str, results: Sequence[ImageResult]) -> Score:
    """One pair's (or one batch's) score: the fraction of its images passing each test."""
    n = len(results)
    if not n:
        return Score(name, 0, 0.0, 0.0, 0.0)
    return Score(name, n, sum(r.subject.passed for r in results) / n, sum(r.style.passed for r in results) / n,
                 sum(r.both for r in results) / n, sum(r.unparsed for r in results),
                 _mean([r.clip_i_subject for r in results]), _mean([r.clip_i_style for r in results]))


def mean_over_pairs(pairs: Sequence[Score]) -> Score:
    """The paper's headline: every pair weighs the same, whatever its number of images."""
    scored = [p for p in pairs if p.images]
    if not scored:
        return Score("mean", 0, 0.0, 0.0, 0.0)
    k = len(scored)
    return Score("mean", sum(p.images for p in scored), sum(p.subject for p in scored) / k,
                 sum(p.style for p in scored) / k, sum(p.both for p in scored) / k,
                 sum(p.unparsed for p in scored),
                 _mean([p.clip_i_subject for p in scored]), _mean([p.clip_i_style for p in scored]))


def format_table(pairs: Sequence[Score], mean: Score) -> str:
    """The paper's layout: one row per pair with subject %, style %, both %, then the mean row."""
    width = max([len("pair"), len("mean")] + [len(p.name) for p in pairs])
    lines = [f"{'pair':<{width}}  {'images':>6}  {'subject %':>9}  {'style %':>7}  {'both %':>6}"]
    rows = [*pairs, mean]
    for row in rows:
        if row is mean:
            lines.append("-" * len(lines[0]))
        lines.append(f"{row.name:<{width}}  {row.images:>6}  {100 * row.subject:>9.1f}  "
                     f"{100 * row.style:>7.1f}  {100 * row.both:>6.1f}")
    if mean.unparsed:
        lines.append(f"unparsed answers: {mean.unparsed} (neither yes nor no; counted as not approving)")
    return "\n".join(lines)
