"""Comparing merge methods on one subject, one style, one seed: which columns, their labels, the labelled grid.

No ComfyUI import: the compare node (nodes/compare.py) samples each column and hands the images here.
A column is a merge method from the registry or a baseline an artist compares against (the base model with no
LoRA, each LoRA alone). A column that could not run is a tile saying why, so one unsuitable method (b-lora on a
layout without a published split, lorarar without a hypernet) does not hide the others.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from . import methods
from .errors import LoraRarError
from .plotting import plain_text

NO_LORA, SUBJECT_ONLY, STYLE_ONLY = "no LoRA", "subject only", "style only"
BASELINES = (NO_LORA, SUBJECT_ONLY, STYLE_ONLY)
ALL = "all"
# a LoRA alone is the direct sum with the other LoRA at strength 0: read by the pack's reader (so every format the
# merge node takes, also those ComfyUI's LoRA loader skips) and patched exactly as each method's merge is
ALONE_METHOD = "direct"
TILE_MIN, TILE_MAX = 256, 512  # px of a tile's long side in the grid: titles stay legible, the grid stays small
_SHOWN_CHARS = 60  # of the methods input in an error: a workflow's STRING widget may hold megabytes


def _shown(text: str) -> str:
    """Text from the methods input, for a message: its repr, at most _SHOWN_CHARS characters of it."""
    return repr(text) if len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS]) + f"... ({len(text)} characters)"


def available_columns() -> tuple[str, ...]:
    """Every column the compare node can draw: the baselines, then the registered methods in registry order."""
    return (*BASELINES, *methods.names())


def select_columns(spec: str) -> list[str]:
    """The columns named by ``spec``: "all", or a comma-separated list of baselines and method names (any case).

    Raises a one-line LoraRarError naming the ``methods`` input for an unknown, repeated or empty entry.
    """
    known = {name.lower(): name for name in available_columns()}
    entries = [entry.strip() for entry in str(spec).split(",")]
    if [e.lower() for e in entries if e] == [ALL]:
        return list(available_columns())
    chosen: list[str] = []
    for entry in entries:
        if not entry:
            raise LoraRarError(f"methods {_shown(str(spec))}: an empty entry; give 'all' or names separated by commas, "
                               f"from: {', '.join(available_columns())}")
        name = known.get(entry.lower())
        if name is None:
            raise LoraRarError(f"methods: unknown {_shown(entry)}; choose 'all' or from: {', '.join(available_columns())}")
        if name in chosen:
            raise LoraRarError(f"methods: {name!r} is named twice")
        chosen.append(name)
    return chosen


def column_label(name: str, params: dict[str, float] | None = None) -> str:
    """One line naming a column and its parameters, e.g. ``np-lora mu=0.5`` (what the labels output carries)."""
    return " ".join([name, *(f"{key}={value:g}" for key, value in (params or {}).items())])


@dataclass
class Column:
    """One column of the comparison: a baseline or method name and its parameters, the images sampled for it
    (one per latent in the batch), or why it could not run (then ``images`` is empty)."""

    name: str
    params: dict[str, float] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)
    failure: str | None = None

    @property
    def label(self) -> str:
        return column_label(self.name, self.params)


def labels_for_images(columns: Sequence[Column]) -> list[str]:
    """One label per image the columns hold, in the order the images output carries them."""
    return [column.label for column in columns for _ in column.images]


@dataclass(frozen=True)
class Tile:
    column: int  # index into the columns
    image: int | None  # index into that column's images; None: the column's failure tile
    row: int
    col: int


def layout(columns: Sequence[Column]) -> tuple[int, int, list[Tile]]:
    """(rows, cols, tiles). One image per column: the tiles wrap into a near-square grid, in column order.
    Several (a latent batch): one grid column per comparison column, one row per batch entry, so each row
    compares the methods on the same noise. A failed column takes one tile."""
    if not columns:
        raise LoraRarError("no columns to compare")
    batch = max([len(c.images) for c in columns] + [1])
    if batch == 1:
        cols = math.ceil(math.sqrt(len(columns)))
        tiles = [Tile(i, 0 if c.images else None, *divmod(i, cols)) for i, c in enumerate(columns)]
        return math.ceil(len(columns) / cols), cols, tiles
    tiles = [Tile(i, j, j, i) for i, c in enumerate(columns) for j in range(len(c.images))]
    tiles += [Tile(i, None, 0, i) for i, c in enumerate(columns) if not c.images]
    return batch, len(columns), tiles


def _tile_size(columns: Sequence[Column]) -> tuple[int, int]:
    """(width, height) px every tile is drawn at: the largest image's aspect, long side in [TILE_MIN, TILE_MAX]."""
    images = [image for column in columns for image in column.images]
    width, height = (max(i.width for i in images), max(i.height for i in images)) if images else (1, 1)
    scale = min(max(TILE_MIN, max(width, height)), TILE_MAX) / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@plain_text
def comparison_grid(columns: Sequence[Column], title: str = "") -> Image.Image:
    """The columns as one RGB picture: every image under its label; a failed column as a grey tile saying why.

    Drawn with matplotlib on its Agg canvas (no pyplot, so no global backend change in ComfyUI's process).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: loading the nodes stays cheap
    from matplotlib.figure import Figure

    rows, cols, tiles = layout(columns)
    tile_w, tile_h = _tile_size(columns)
    dpi, title_h, top = 100, 44, (36 if title else 8)  # px: label band above each tile, figure title
    cell_h = tile_h + title_h
    width, height = cols * tile_w + (cols + 1) * 8, top + rows * (cell_h + 8)
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    if title:
        # shortened here, not wrap=True: matplotlib measures wrapped text as math when it holds a $ pair
        figure.text(0.5, 1 - 18 / height, textwrap.shorten(title, width=max(20, width // 9), placeholder=" ..."),
                    ha="center", va="center", fontsize=12, weight="bold")
    for tile in tiles:
        column = columns[tile.column]
        left = 8 + tile.col * (tile_w + 8)
        bottom = height - top - tile.row * (cell_h + 8) - cell_h
        axes = figure.add_axes((left / width, bottom / height, tile_w / width, tile_h / height))
        axes.set_xticks([])
        axes.set_yticks([])
        params = column_label("", column.params).strip()
        figure.text((left + tile_w / 2) / width, (bottom + tile_h + title_h / 2) / height,
                    column.name + ("\n" + params if params else ""), ha="center", va="center", fontsize=10,
                    linespacing=1.3, weight="bold" if not column.failure else "normal")
        if tile.image is None:
            axes.set_facecolor("#e6e6e6")
            reason = textwrap.fill(f"did not run: {column.failure}", width=max(16, tile_w // 7))
            axes.text(0.5, 0.5, reason, ha="center", va="center", fontsize=8.5, color="#a02020",
                      transform=axes.transAxes)
        else:
            picture = column.images[tile.image].convert("RGB").resize((tile_w, tile_h), Image.Resampling.LANCZOS)
            axes.imshow(picture, interpolation="nearest")
            axes.set_axis_off()
    with warnings.catch_warnings():  # a label outside the font's glyphs is drawn as boxes, not warned per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
