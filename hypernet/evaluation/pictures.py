"""Pictures of a judged batch: each image with its verdicts, a grid of them, the scores as a bar chart."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import LoraRarError
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
