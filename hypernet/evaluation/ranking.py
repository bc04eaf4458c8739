"""Ranking labelled images (e.g. one per merge method) by the paper's protocol: both %, then subject %, then style %.

The compare node's ``labels`` output names each image (one line per image); images with the same label are
scored together (a latent batch gives several per method), as one pair is in the paper's table.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import LoraRarError
from .protocol import ImageResult, Score, score

MAX_LABEL = 200  # characters per label: a method name and its parameters need far fewer


def parse_labels(text: str, images: int) -> list[str]:
    """One label per line, one line per image (blank lines at the end ignored); a one-line error otherwise."""
    labels = [line.strip() for line in str(text).rstrip().splitlines()]
    if len(labels) != images:
        raise LoraRarError(f"labels: {len(labels)} lines for {images} images; give one label per image, one per "
                           "line (the LoRA.rar Compare node's labels output)")
    blank = next((i for i, label in enumerate(labels) if not label), None)
    if blank is not None:
        raise LoraRarError(f"labels: line {blank + 1} is blank; give every image a label")
    long = next((i for i, label in enumerate(labels) if len(label) > MAX_LABEL), None)
    if long is not None:  # the ranking text pads every row to the longest label
        raise LoraRarError(f"labels: line {long + 1} has {len(labels[long])} characters; at most {MAX_LABEL}")
    return labels


def rank(labels: Sequence[str], results: Sequence[ImageResult]) -> list[Score]:
    """One score per distinct label, best first: by both %, then subject %, then style %; ties keep the order in
    which the labels first appear."""
    if len(labels) != len(results):
        raise LoraRarError(f"labels: {len(labels)} labels for {len(results)} judged images")
    groups: dict[str, list[ImageResult]] = {}
    for label, result in zip(labels, results):
        groups.setdefault(label, []).append(result)
    scores = [score(label, group) for label, group in groups.items()]
    return sorted(scores, key=lambda s: (-s.both, -s.subject, -s.style))  # sorted() is stable


def ranking_rows(scores: Sequence[Score]) -> list[dict]:
    """The ranking as JSON rows: rank (1 = best; equal scores share a rank), label, images, percentages."""
    rows, previous = [], None
    for position, entry in enumerate(scores, start=1):
        key = (entry.both, entry.subject, entry.style)
        rows.append({"rank": rows[-1]["rank"] if key == previous else position, "label": entry.name,
                     "images": entry.images, "subject_pct": round(100 * entry.subject, 2),
                     "style_pct": round(100 * entry.style, 2), "both_pct": round(100 * entry.both, 2)})
        previous = key
    return rows


def format_ranking(scores: Sequence[Score]) -> str:
    """A text table: rank, label, images, subject %, style %, both %; best first."""
    rows = ranking_rows(scores)
    width = max([len("method")] + [len(row["label"]) for row in rows])
    lines = [f"{'rank':>4}  {'method':<{width}}  {'images':>6}  {'subject %':>9}  {'style %':>7}  {'both %':>6}"]
    lines += [f"{row['rank']:>4}  {row['label']:<{width}}  {row['images']:>6}  {row['subject_pct']:>9.1f}  "
              f"{row['style_pct']:>7.1f}  {row['both_pct']:>6.1f}" for row in rows]
    return "\n".join(lines)
