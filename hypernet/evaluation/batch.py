"""The batch over folders: ``<generated>/<subject>__<style>/<images>`` judged against ``<subjects>/<subject>/``
and ``<styles>/<style>/``, resumable.

Only images not finished before are asked (``results.json`` is the state, rewritten atomically after
every image); the run ends by writing ``results.json``, ``results.csv`` (per image), ``pairs.csv`` and
``summary.png``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import LoraRarError
from ..files import file_sha256
from .batch_files import (atomic_write, image_rows_csv, list_images, load_image, pair_rows_csv, prepare_out_dir,
                          read_json)
from .judge import Judge, public_url
from .pictures import summary_chart
from .protocol import (MAX_SIDE, SUBJECT_QUESTION, ImageResult, Score, judge_image, mean_over_pairs, score,
                       style_question)

PAIR_SEPARATOR = "__"
STATE_VERSION = 1
MAX_STATE_BYTES = 256 * 1024 * 1024  # results.json: ~1 KB per image in practice, 20 KB with 20 long answers
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------ the pair folders

def derive_style_name(folder_name: str) -> str:
    """``watercolor_painting3`` -> ``watercolor painting``: underscores to spaces, trailing digits dropped."""
    name = re.sub(r"\d+$", "", folder_name).replace("_", " ").strip()
    return name or folder_name.replace("_", " ")


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


# ------------------------------------------------------------------ the resumable state

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


# ------------------------------------------------------------------ the run

def evaluate_folders(jobs: Sequence[PairJob], judge: Judge, out_dir: Path, model: str, endpoint: str = "",
                     resume: bool = True, max_side: int = MAX_SIDE,
                     log: Callable[[str], None] = print) -> BatchResult:
    """Judge every image of every pair (skipping finished ones) and write the result files.

    Files in ``out_dir``: results.json (state + per image + per pair + mean), results.csv,
    pairs.csv, summary.png. Partial results survive any interruption (each image is saved as it ends).
    """
    out_dir = prepare_out_dir(out_dir)
    state = BatchState(out_dir, _protocol(model, endpoint, max_side), resume)
    results: dict[str, ImageResult] = {}
    asked = questions = 0
    for job in jobs:
        subject_hashes = [_sha256(p) for p in job.subject_refs]
        style_hashes = [_sha256(p) for p in job.style_refs]
        subject_refs = style_refs = None  # decoded lazily: a finished pair never opens them
        for path in job.images:
            key = f"{job.pair}/{path.name}"
            fingerprint = _fingerprint(path, subject_hashes, style_hashes, job.style_name, model, max_side)
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
    _write_reports(out_dir, state, results, pairs, mean)
    return BatchResult(pairs, mean, results, asked, questions)


def _protocol(model: str, endpoint: str, max_side: int) -> dict:
    """How every image was asked, as results.json records it (the endpoint without credentials)."""
    return {"judge_model": model, "judge_endpoint": public_url(endpoint) if endpoint else "",
            "max_side": max_side, "subject_question": SUBJECT_QUESTION,
            "style_question": style_question("<style>"), "vote": "yes fraction > 0.5"}


def _fingerprint(image: Path, subject_hashes: list[str], style_hashes: list[str], style_name: str, model: str,
                 max_side: int) -> str:
    """sha256 of what was asked about ``image``: its bytes, the references', both questions, the model, the size."""
    return hashlib.sha256(json.dumps(
        [_sha256(image), subject_hashes, style_hashes, SUBJECT_QUESTION, style_question(style_name),
         model, max_side]).encode()).hexdigest()


def _write_reports(out_dir: Path, state: BatchState, results: dict[str, ImageResult], pairs: list[Score],
                   mean: Score) -> None:
    """The final results.json, results.csv, pairs.csv and summary.png."""
    # records of images no longer on disk are dropped: the report lists exactly this run's images
    state.records = {key: state.records[key] for key in results}
    state.write(pairs=[p.as_dict() for p in pairs], mean=mean.as_dict())
    atomic_write(out_dir / "results.csv", image_rows_csv(results))
    atomic_write(out_dir / "pairs.csv", pair_rows_csv(pairs, mean))
    png = io.BytesIO()
    summary_chart(pairs, mean).save(png, format="PNG")
    atomic_write(out_dir / "summary.png", png.getvalue())
