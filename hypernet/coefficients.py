"""Where a merge kept the subject and where the style: per-block summaries and a picture of the column
coefficients a method predicted (LoRA.rar's hypernet; any method that fills ``MergedLora.coefficients``).

Coefficients come per layer as a (d_in, 2) tensor: column j of the merged update is
m_subject[j] * dW_subject[:, j] + m_style[j] * dW_style[:, j]. Layers are grouped by UNet block as ComfyUI
and kohya name them (``input_blocks.4``, ``middle_block``, ``output_blocks.0``) and by attention projection
(q, k, v, out). Every mean here is over columns (a layer with more input columns weighs more), and a
column is "style-dominant" where |m_style| > |m_subject|.
"""

from __future__ import annotations

import re
import textwrap
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from PIL import Image

from .errors import LoraRarError
from .plotting import plain_text

_LAYER = re.compile(r"^lora_unet_(?:input_blocks_(?P<input>\d+)|(?P<middle>middle_block)|output_blocks_(?P<output>\d+))"
                    r"_\d+_(?:transformer_blocks_(?P<depth>\d+)_)?.*_(?P<proj>to_q|to_k|to_v|to_out_0)$")
PROJECTIONS = ("q", "k", "v", "out")
SUBJECT_COLOUR, STYLE_COLOUR = "#4285f4", "#fb8c00"  # the evaluation chart's subject / style colours


def block_of(name: str) -> tuple[str, str]:
    """(block, projection) of a canonical layer name: ``lora_unet_input_blocks_4_1_..._attn1_to_q`` ->
    ("input_blocks.4", "q"); names outside the UNet's attention land in ("other", "other")."""
    match = _LAYER.match(name)
    if not match:
        return "other", "other"
    if match.group("middle"):
        block = "middle_block"
    elif match.group("input") is not None:
        block = f"input_blocks.{match.group('input')}"
    else:
        block = f"output_blocks.{match.group('output')}"
    return block, match.group("proj").removeprefix("to_").removesuffix("_0")


def _block_order(block: str) -> tuple[int, int]:
    """Model order: input blocks, the middle block, output blocks, then anything else."""
    kind, _, index = block.partition(".")
    rank = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(kind, 3)
    return rank, int(index) if index.isdigit() else 0


def _group_order(key: tuple[str, str]) -> tuple:
    block, projection = key
    return _block_order(block), PROJECTIONS.index(projection) if projection in PROJECTIONS else len(PROJECTIONS)


@dataclass(frozen=True)
class CoefficientGroup:
    """The coefficients of one (block, projection): how many layers and columns, the column means of the
    subject and style coefficients, and the share (0..1) of columns where the style's is larger in size."""

    block: str
    projection: str
    layers: int
    columns: int
    subject_mean: float
    style_mean: float
    style_dominant: float

    def as_dict(self) -> dict:
        return asdict(self)


def _stats(tensors: list[torch.Tensor], block: str, projection: str) -> CoefficientGroup:
    stacked = torch.cat([t.to(torch.float32).reshape(-1, 2) for t in tensors])  # (columns, 2)
    means = stacked.mean(0).tolist()
    dominant = (stacked[:, 1].abs() > stacked[:, 0].abs()).float().mean().item()
    return CoefficientGroup(block, projection, len(tensors), stacked.shape[0], means[0], means[1], dominant)


def grouped(coefficients: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], list[str]]:
    """(block, projection) -> its layer names, both in model order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in coefficients:
        groups.setdefault(block_of(name), []).append(name)
    return {key: groups[key] for key in sorted(groups, key=_group_order)}


def summarize(coefficients: Mapping[str, torch.Tensor]) -> list[CoefficientGroup]:
    """One :class:`CoefficientGroup` per (block, projection) that has coefficients, in model order."""
    return [_stats([coefficients[name] for name in names], *key) for key, names in grouped(coefficients).items()]


def overall(coefficients: Mapping[str, torch.Tensor], projection: str | None = None) -> CoefficientGroup:
    """All layers' columns together (or only one projection's)."""
    tensors = [c for name, c in coefficients.items() if projection is None or block_of(name)[1] == projection]
    if not tensors:
        raise LoraRarError("no layer has merge coefficients to summarize")
    return _stats(tensors, "all", projection or "all")


def summary_lines(groups: list[CoefficientGroup]) -> list[str]:
    """One line per block: each projection's subject and style means and style-dominant share."""
    by_block: dict[str, list[CoefficientGroup]] = {}
    for group in groups:
        by_block.setdefault(group.block, []).append(group)
    return [f"{block}: " + " | ".join(
        f"{g.projection} subject {g.subject_mean:.2f} style {g.style_mean:.2f} style-dominant {g.style_dominant:.0%}"
        for g in parts) for block, parts in by_block.items()]


# ---------------------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------------------

_QUANTILES = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])


def _layer_quantiles(coefficients: torch.Tensor) -> torch.Tensor:
    """(5, 2): 5th, 25th, 50th, 75th, 95th percentile of a layer's subject and style columns."""
    return torch.quantile(coefficients.to(torch.float32).reshape(-1, 2), _QUANTILES, dim=0)


def _draw_projection(axes, projection: str, groups: dict[tuple[str, str], list[str]],
                     coefficients: Mapping[str, torch.Tensor]) -> None:
    """One row: a pair of boxes per layer (subject left, style right), layers grouped by block."""
    x, ticks, labels, position = [], [], [], 0.0
    quantiles = []
    for index, ((block, _), names) in enumerate((k, v) for k, v in groups.items() if k[1] == projection):
        start = position
        for name in names:
            x.append(position)
            quantiles.append(_layer_quantiles(coefficients[name]))
            position += 1.0
        if index % 2:
            axes.axvspan(start - 0.5, position - 0.5, color="#f3f3f3", zorder=0)
        stats = _stats([coefficients[name] for name in names], block, projection)
        axes.text((start + position - 1) / 2, 1.0, f"style\n{stats.style_dominant:.0%}", transform=axes.get_xaxis_transform(),
                  ha="center", va="bottom", fontsize=7, color=STYLE_COLOUR)
        ticks.append((start + position - 1) / 2)
        labels.append(block)
        position += 1.0  # a gap between blocks
    q = torch.stack(quantiles).numpy()  # (layers, 5, 2)
    width = 0.36 if len(x) < 60 else 0.42
    for side, (offset, colour) in enumerate(((-0.21, SUBJECT_COLOUR), (0.21, STYLE_COLOUR))):
        xs = [value + offset for value in x]
        axes.vlines(xs, q[:, 0, side], q[:, 4, side], color=colour, linewidth=0.8, zorder=2)
        axes.bar(xs, q[:, 3, side] - q[:, 1, side], width, bottom=q[:, 1, side], color=colour, alpha=0.75,
                 linewidth=0, zorder=3)
        axes.hlines(q[:, 2, side], [v - width / 2 for v in xs], [v + width / 2 for v in xs], color="black",
                    linewidth=0.8, zorder=4)
    axes.axhline(0.0, color="#999999", linewidth=0.6, zorder=1)
    axes.set_xticks(ticks, labels, rotation=25, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_xlim(-1, position - 1)
    everything = overall(coefficients, projection)
    axes.set_title(f"to_{projection}: {everything.layers} layers, subject mean {everything.subject_mean:.2f}, style mean "
                   f"{everything.style_mean:.2f}, style dominates {everything.style_dominant:.0%} of columns",
                   fontsize=10, loc="left", pad=24)
    axes.set_ylabel("coefficient")
    axes.grid(axis="y", color="#e1e1e1")
    axes.set_axisbelow(True)


@plain_text
def coefficient_picture(coefficients: Mapping[str, torch.Tensor], title: str = "") -> Image.Image:
    """RGB picture of every layer's subject and style coefficients (box: middle half of the layer's columns,
    black line: median, whiskers: 5th to 95th percentile), one row per projection, layers in model order and
    grouped by block, with each block's style-dominant share above it and the row's means in its title.

    Drawn on matplotlib's Agg canvas: headless, and pyplot's global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not coefficients:
        raise LoraRarError("no layer has merge coefficients to draw")
    groups = grouped(coefficients)
    projections = [p for p in (*PROJECTIONS, "other") if any(key[1] == p for key in groups)]
    most = max(sum(len(v) + 1 for k, v in groups.items() if k[1] == p) for p in projections)
    figure = Figure(figsize=(min(24.0, max(9.0, 2.0 + 0.11 * most)), 1.6 + 3.2 * len(projections)), dpi=100,
                    layout="constrained")
    canvas = FigureCanvasAgg(figure)
    for row, projection in enumerate(projections):
        _draw_projection(figure.add_subplot(len(projections), 1, row + 1), projection, groups, coefficients)
    everything = overall(coefficients)
    summary = (f"all {everything.layers} layers: subject mean {everything.subject_mean:.3f}, style mean "
               f"{everything.style_mean:.3f}, style dominates {everything.style_dominant:.1%} of columns")
    legend = ("one pair of boxes per layer, in model order (box: middle half of its columns, line: median, "
              "whiskers: 5-95%); above each block: its share of style-dominant columns")
    characters = int(figure.get_figwidth() * 100 / 7.2)  # about what one line of 10-point text holds
    lines = [wrapped for line in filter(None, [title, summary, legend]) for wrapped in textwrap.wrap(line, characters)]
    figure.suptitle("\n".join(lines), fontsize=10, x=0.01, ha="left")
    figure.legend(handles=[Patch(color=SUBJECT_COLOUR, label="subject coefficient"),
                           Patch(color=STYLE_COLOUR, label="style coefficient")],
                  loc="outside lower center", ncol=2, frameon=False)
    with warnings.catch_warnings():  # file names outside the font's glyphs are drawn as boxes, not warned about
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
