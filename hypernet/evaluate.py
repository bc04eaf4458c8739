"""The paper's MLLM evaluation protocol (arXiv 2412.05148, MARS2) and CLIP-I, with no ComfyUI import.

Per generated image: one yes/no question per subject reference ("same subject? colour and details
matter, style may differ") and one per style reference ("in the named style? ignore the subject"),
images resized to at most 512 px on the long side, greedy decoding. An answer containing the word
"yes" is yes, else one containing "no" is no, else it is *unparsed* (recorded and reported, and not
an approval). Subject (style) passes when the yes fraction over its references is strictly above
0.5; an image is correct when both pass. Scores are averaged per pair, then over pairs.

The batch side reads ``<generated>/<subject>__<style>/<images>``, asks only images it has not
finished before (``results.json`` is the resumable state, rewritten atomically after every image)
and writes ``results.json``, ``results.csv`` (per image), ``pairs.csv`` and ``summary.png``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import LoraRarError
from .files import atomic_file, file_sha256
from .judge import ANSWER_CHARS, Judge, UnreadableAnswer, public_url

MAX_SIDE = 512
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PAIR_SEPARATOR = "__"
STATE_VERSION = 1
MAX_STATE_BYTES = 256 * 1024 * 1024  # results.json: ~1 KB per image in practice, 20 KB with 20 long answers
MAX_STYLE_NAMES_BYTES = 1024 * 1024
MAX_REFERENCES = 10_000  # per image and kind, in a saved vote: far above any real set of reference images
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")

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


# ------------------------------------------------------------------ pictures

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, one size
        return ImageFont.load_default()


PASS_COLOUR, FAIL_COLOUR = (40, 160, 70), (200, 50, 50)


def annotate(image: Image.Image, result: ImageResult) -> Image.Image:
    """A copy of ``image`` with its subject / style verdicts in a banner and a pass/fail border."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    size = max(10, image.width // 22)
    font = _font(size)
    lines = [(f"subject {result.subject.count('yes')}/{len(result.subject.verdicts)} "
              f"{'PASS' if result.subject.passed else 'FAIL'}", result.subject.passed),
             (f"style {result.style.count('yes')}/{len(result.style.verdicts)} "
              f"{'PASS' if result.style.passed else 'FAIL'}", result.style.passed)]
    if result.unparsed:
        lines.append((f"unparsed {result.unparsed}", False))
    pad = max(2, size // 4)
    line_h = draw.textbbox((0, 0), "Subject 0/0 PASSgy", font=font)[3] + pad
    banner = len(lines) * line_h + 2 * pad
    draw.rectangle([0, image.height - banner, image.width, image.height], fill=(0, 0, 0))
    for i, (text, ok) in enumerate(lines):
        draw.text((pad * 2, image.height - banner + pad + i * line_h), text,
                  fill=PASS_COLOUR if ok else FAIL_COLOUR, font=font)
    border = max(2, image.width // 80)
    draw.rectangle([0, 0, image.width - 1, image.height - 1],
                   outline=PASS_COLOUR if result.both else FAIL_COLOUR, width=border)
    return image


def grid(images: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Tiles of equal cell size (the largest image's) in ``columns`` (default ~square), on black."""
    if not images:
        raise LoraRarError("no images to lay out in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap))
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        canvas.paste(image.convert("RGB"), (col * (cell_w + gap), row * (cell_h + gap)))
    return canvas


def summary_chart(pairs: Sequence[Score], mean: Score) -> Image.Image:
    """Grouped bars (subject, style, both, in %) per pair plus the mean, as an RGB image."""
    groups = [*pairs, mean]
    bar, inner, outer, plot_h, left, top, label_h = 22, 3, 26, 300, 48, 56, 190
    group_w = 3 * bar + 2 * inner
    width = left + len(groups) * (group_w + outer) + outer
    chart = Image.new("RGB", (max(width, 420), top + plot_h + label_h), "white")
    draw = ImageDraw.Draw(chart)
    font, small = _font(14), _font(11)
    colours = {"subject": (66, 133, 244), "style": (251, 140, 0), "both": (52, 168, 83)}
    draw.text((left, 8), "LoRA.rar MLLM evaluation: approved images (%)", fill="black", font=font)
    for i, (name, colour) in enumerate(colours.items()):
        x = left + i * 75
        draw.rectangle([x, 30, x + 10, 40], fill=colour)
        draw.text((x + 14, 28), name, fill="black", font=small)
    base_y = top + plot_h
    for pct in range(0, 101, 25):
        y = base_y - plot_h * pct / 100
        draw.line([left - 4, y, chart.width - 8, y], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{pct}%", fill="black", font=small)
    for g, group in enumerate(groups):
        x0 = left + outer + g * (group_w + outer)
        for b, key in enumerate(colours):
            value = getattr(group, key)
            x = x0 + b * (bar + inner)
            draw.rectangle([x, base_y - plot_h * value, x + bar, base_y], fill=colours[key])
        # pair names read downwards: draw them on a rotated strip
        label = Image.new("RGB", (label_h - 6, 14), "white")
        name = group.name if len(group.name) <= 32 else group.name[:31] + "…"
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=small)
        rotated = label.rotate(-90, expand=True)
        chart.paste(rotated, (x0 + group_w // 2 - 7, base_y + 4))
    draw.line([left - 4, base_y, chart.width - 8, base_y], fill="black")
    return chart


# ------------------------------------------------------------------ files

def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, flushed and renamed."""
    try:
        with atomic_file(path) as temp:
            temp.write_bytes(data.encode() if isinstance(data, str) else data)
    except OSError as error:
        raise LoraRarError(f"{path}: cannot write it ({error.strerror or type(error).__name__}); "
                           "check that the output folder is a writable folder") from None


def prepare_out_dir(out_dir: Path) -> Path:
    """``out_dir``, created if missing; a one-line error when it is a file, lies inside one, or cannot be made."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LoraRarError(f"{out_dir}: is a file, not a folder; give --out a folder for the result files")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LoraRarError(f"{out_dir}: cannot create the output folder ({error.strerror or type(error).__name__}); "
                           "is a part of the path a file?") from None
    for name in ("results.json", "results.csv", "pairs.csv", "summary.png"):
        if (out_dir / name).is_dir():
            raise LoraRarError(f"{out_dir / name}: is a folder; remove it or choose another --out")
    return out_dir


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def image_rows_csv(results: dict[str, ImageResult]) -> str:
    """One row per image: pair, image, yes/no/unparsed counts and pass flags for subject and style."""
    header = ["pair", "image", "subject_yes", "subject_no", "subject_unparsed", "subject_pass",
              "style_yes", "style_no", "style_unparsed", "style_pass", "both"]
    rows = []
    for key in sorted(results):
        r = results[key]
        pair = key.rsplit("/", 1)[0]
        rows.append([pair, r.name, r.subject.count("yes"), r.subject.count("no"), r.subject.count("unparsed"),
                     int(r.subject.passed), r.style.count("yes"), r.style.count("no"), r.style.count("unparsed"),
                     int(r.style.passed), int(r.both)])
    return _csv_text(header, rows)


def pair_rows_csv(pairs: Sequence[Score], mean: Score) -> str:
    header = ["pair", "images", "subject_pct", "style_pct", "both_pct", "unparsed"]
    return _csv_text(header, [[p.name, p.images, f"{100 * p.subject:.2f}", f"{100 * p.style:.2f}",
                               f"{100 * p.both:.2f}", p.unparsed] for p in [*pairs, mean]])


# ------------------------------------------------------------------ the batch over folders

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def derive_style_name(folder_name: str) -> str:
    """``watercolor_painting3`` -> ``watercolor painting``: underscores to spaces, trailing digits dropped."""
    name = re.sub(r"\d+$", "", folder_name).replace("_", " ").strip()
    return name or folder_name.replace("_", " ")


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, a regular file (or a link to one) of at most ``max_bytes``; ValueError saying why not.

    Opened non-blocking and checked on the open descriptor: a FIFO cannot hang the run, /dev/zero cannot
    fill the memory, and nothing is swapped in between the check and the read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        raise ValueError(error.strerror or type(error).__name__) from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file: a device, pipe, socket or folder")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes // (1024 * 1024)} MiB")
    return data


def _no_constants(name: str):
    raise ValueError(f"{name} is not standard JSON")


def read_json(path: Path, max_bytes: int):
    """Standard JSON (no NaN or Infinity) from a regular file of at most ``max_bytes``; ValueError saying why not."""
    data = read_regular_file(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not readable JSON: not UTF-8 text") from None
    except ValueError as error:  # JSONDecodeError's text names a position, never echoes the file
        raise ValueError(f"not readable JSON: {str(error).splitlines()[0][:120]}") from None


def load_style_names(path: Path | None) -> dict[str, str]:
    """A JSON object {style folder name: style name for the question}, or {} without a file."""
    if path is None:
        return {}
    try:
        names = read_json(Path(path), MAX_STYLE_NAMES_BYTES)
    except ValueError as error:
        raise LoraRarError(f"{path}: cannot read the style-name mapping ({error})") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise LoraRarError(f"{path}: expected a JSON object mapping style folder names to style names")
    return names


def load_image(path: Path, max_side: int = MAX_SIDE) -> Image.Image:
    try:
        with Image.open(path) as image:
            return resize_long_side(image, max_side)
    # decoders raise more than OSError on hostile files: DecompressionBombError (too many pixels),
    # SyntaxError, struct.error, ...; each is this one file's problem, said in one line
    except Exception as error:  # noqa: BLE001
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise LoraRarError(f"{path}: cannot read the image ({reason})") from None


@dataclass
class PairJob:
    """One ``<subject>__<style>`` folder of generated images and its reference images."""

    pair: str
    style_name: str
    images: list[Path]
    subject_refs: list[Path]
    style_refs: list[Path]


def find_pairs(generated: Path, subjects: Path, styles: Path, style_names: dict[str, str] | None = None,
               skip: Sequence[Path] = ()) -> list[PairJob]:
    """The pair folders under ``generated`` matched to ``subjects/<subject>/`` and ``styles/<style>/``."""
    generated, style_names = Path(generated), style_names or {}
    for folder in (generated, subjects, styles):
        if not Path(folder).is_dir():
            raise LoraRarError(f"{folder}: not a folder")
    skipped = {Path(p).resolve() for p in skip}
    jobs = []
    for folder in sorted(p for p in generated.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.resolve() in skipped:
            continue
        subject, sep, style = folder.name.partition(PAIR_SEPARATOR)
        if not sep or not subject or not style:
            raise LoraRarError(f"{folder}: pair folders must be named <subject>{PAIR_SEPARATOR}<style>")
        refs = []
        for root, name in ((Path(subjects), subject), (Path(styles), style)):
            found = list_images(root / name) if (root / name).is_dir() else []
            if not found:
                raise LoraRarError(f"{root / name}: no reference images for pair {folder.name}")
            refs.append(found)
        images = list_images(folder)
        for name in [folder, *images]:  # both end up in results.csv and on stdout, which are UTF-8
            _check_utf8_name(name)
        if images:
            jobs.append(PairJob(folder.name, style_names.get(style, derive_style_name(style)), images, *refs))
    if not jobs:
        raise LoraRarError(f"{generated}: no <subject>{PAIR_SEPARATOR}<style> folders with images found")
    return jobs


def _check_utf8_name(path: Path) -> None:
    """Refuse a file name that is not valid UTF-8 (Python holds its bad bytes as lone surrogates)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise LoraRarError(f"{str(path)!r}: the name is not valid UTF-8; rename it (results.csv and the "
                           "report are UTF-8)") from None


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)  # in blocks: an image file is never read whole just to fingerprint it
    except OSError as error:
        raise LoraRarError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None


@dataclass
class BatchResult:
    pairs: list[Score]
    mean: Score
    images: dict[str, ImageResult]
    asked: int  # images asked in this run (the rest came from the saved state)
    questions: int


class BatchState:
    """``results.json`` in ``out_dir``: finished images keyed ``<pair>/<file>`` with a fingerprint of
    what was asked (image and reference bytes, questions, model, size), so changed inputs are asked again."""

    def __init__(self, out_dir: Path, protocol: dict, resume: bool = True):
        self.path = Path(out_dir) / "results.json"
        self.protocol = protocol
        self.records: dict[str, dict] = {}
        self.finished: dict[str, ImageResult] = {}
        if resume and self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read every saved record now, so a corrupt file stops the run before any question is asked."""
        fix = "delete it or pass --restart"
        try:
            saved = read_json(self.path, MAX_STATE_BYTES)
        except ValueError as error:
            raise LoraRarError(f"{self.path}: cannot resume from it ({error}); {fix}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("images", {}), dict):
            raise LoraRarError(f"{self.path}: cannot resume from it (expected a JSON object with an 'images' "
                               f"object, as this tool writes); {fix}")
        if saved.get("version") != STATE_VERSION:
            return  # another version's state: asked again, then overwritten
        for key, record in saved.get("images", {}).items():
            try:
                result = ImageResult.from_dict(record)
                fingerprint = record["fingerprint"]
                if not (isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint) and len(key) <= 2048):
                    raise TypeError
            except (KeyError, TypeError, ValueError, AttributeError):
                raise LoraRarError(f"{self.path}: cannot resume from it (record {key[:200]!r} is not a result this "
                                   f"tool wrote); {fix}") from None
            # rebuilt from the checked values: whatever else the file held is not written back
            self.records[key] = {**result.as_dict(), "fingerprint": fingerprint}
            self.finished[key] = result

    def done(self, key: str, fingerprint: str) -> ImageResult | None:
        record = self.records.get(key)
        return self.finished[key] if record and record.get("fingerprint") == fingerprint else None

    def save(self, key: str, fingerprint: str, result: ImageResult) -> None:
        self.records[key] = {**result.as_dict(), "fingerprint": fingerprint}
        self.finished[key] = result
        self.write()

    def write(self, **extra) -> None:
        atomic_write(self.path, json.dumps({"version": STATE_VERSION, "protocol": self.protocol,
                                            "images": self.records, **extra}, indent=1, allow_nan=False))


def evaluate_folders(jobs: Sequence[PairJob], judge: Judge, out_dir: Path, model: str, endpoint: str = "",
                     resume: bool = True, max_side: int = MAX_SIDE,
                     log: Callable[[str], None] = print) -> BatchResult:
    """Judge every image of every pair (skipping finished ones) and write the result files.

    Files in ``out_dir``: results.json (state + per image + per pair + mean), results.csv,
    pairs.csv, summary.png. Partial results survive any interruption (each image is saved as it ends).
    """
    out_dir = prepare_out_dir(out_dir)
    protocol = {"judge_model": model, "judge_endpoint": public_url(endpoint) if endpoint else "",
                "max_side": max_side, "subject_question": SUBJECT_QUESTION,
                "style_question": style_question("<style>"), "vote": "yes fraction > 0.5"}
    state = BatchState(out_dir, protocol, resume)
    results: dict[str, ImageResult] = {}
    asked = questions = 0
    for job in jobs:
        subject_hashes = [_sha256(p) for p in job.subject_refs]
        style_hashes = [_sha256(p) for p in job.style_refs]
        subject_refs = style_refs = None  # decoded lazily: a finished pair never opens them
        for path in job.images:
            key = f"{job.pair}/{path.name}"
            fingerprint = hashlib.sha256(json.dumps(
                [_sha256(path), subject_hashes, style_hashes, SUBJECT_QUESTION, style_question(job.style_name),
                 model, max_side]).encode()).hexdigest()
            result = state.done(key, fingerprint)
            if result is None:
                if subject_refs is None:
                    subject_refs = [load_image(p, max_side) for p in job.subject_refs]
                    style_refs = [load_image(p, max_side) for p in job.style_refs]
                result = judge_image(judge, path.name, load_image(path, max_side), subject_refs, style_refs,
                                     job.style_name)
                state.save(key, fingerprint, result)
                asked += 1
                questions += len(subject_refs) + len(style_refs)
                log(f"{key}: subject {result.subject.count('yes')}/{len(subject_refs)}, "
                    f"style {result.style.count('yes')}/{len(style_refs)}" + (" (both)" if result.both else ""))
            results[key] = result
    pairs = [score(job.pair, [results[f"{job.pair}/{p.name}"] for p in job.images]) for job in jobs]
    mean = mean_over_pairs(pairs)
    # records of images no longer on disk are dropped: the report lists exactly this run's images
    state.records = {key: state.records[key] for key in results}
    state.write(pairs=[p.as_dict() for p in pairs], mean=mean.as_dict())
    atomic_write(out_dir / "results.csv", image_rows_csv(results))
    atomic_write(out_dir / "pairs.csv", pair_rows_csv(pairs, mean))
    png = io.BytesIO()
    summary_chart(pairs, mean).save(png, format="PNG")
    atomic_write(out_dir / "summary.png", png.getvalue())
    return BatchResult(pairs, mean, results, asked, questions)
