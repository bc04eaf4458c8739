"""Pictures of a judged batch: each image with its verdicts, a grid of them, the scores as a bar chart."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import LoraRarError
from ..plotting import plain_text
from .protocol import ImageResult, Score


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


SCORE_COLOURS = {"subject": "#4285f4", "style": "#fb8c00", "both": "#34a853"}  # bar colours, one per test


@plain_text
def summary_chart(pairs: Sequence[Score], mean: Score) -> Image.Image:
    """Grouped bars (subject, style, both, in %) per pair plus the mean, as an RGB image.

    Drawn with matplotlib on its Agg canvas: no display, and no change to pyplot's global backend, which
    other code in the same process (ComfyUI, other node packs) may rely on.
    """
    # imported here: only the batch CLI draws charts, so loading the nodes never pays for matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*pairs, mean]
    names = [g.name if len(g.name) <= 32 else g.name[:31] + "…" for g in groups]
    # the figure grows with the longest name (names read downwards beneath the bars), so the bars keep their height
    height = 4.2 + 0.09 * max(len(name) for name in names)
    figure = Figure(figsize=(max(4.2, 1.2 + 0.9 * len(groups)), height), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.27
    for offset, (test, colour) in enumerate(SCORE_COLOURS.items(), start=-1):
        positions = [index + offset * width for index in range(len(groups))]
        axes.bar(positions, [100 * getattr(group, test) for group in groups], width, color=colour, label=test)
    axes.set_xticks(range(len(groups)), names, rotation=90)
    axes.set_ylim(0, 100)
    axes.set_yticks(range(0, 101, 25), [f"{pct}%" for pct in range(0, 101, 25)])
    axes.grid(axis="y", color="#e1e1e1")
    axes.set_axisbelow(True)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    figure.suptitle("LoRA.rar MLLM evaluation: approved images (%)")
    with warnings.catch_warnings():  # a name outside the font's glyphs is drawn as boxes, not warned about per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
