"""The batch's files: bounded readers for what a user hands in (images, style names, results.json) and
atomic writers for what it writes (results.json, results.csv, pairs.csv, summary.png)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ..errors import LoraRarError
from ..files import atomic_file
from .protocol import MAX_SIDE, ImageResult, Score, resize_long_side

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_STYLE_NAMES_BYTES = 1024 * 1024


# ------------------------------------------------------------------ reading

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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


# ------------------------------------------------------------------ writing

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
