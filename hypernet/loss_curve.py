"""The ZipLoRA node's loss curve: the objective and its terms per optimisation step, as a PIL image."""

from __future__ import annotations

import warnings

from PIL import Image

from .plotting import plain_text

LOSS_TERMS = (("total", "total"), ("subject", "subject MSE"), ("style", "style MSE"))


@plain_text
def loss_curve(history: list[dict[str, float]], title: str) -> Image.Image:
    """history: per step {"total", "subject", "style", "similarity"} -> RGB line charts (the losses; the summed
    |cos| on its own axis). Drawn on matplotlib's Agg canvas: headless, pyplot's global backend left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    losses, similarity = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    steps = list(range(1, len(history) + 1))
    marker = "o" if len(steps) < 20 else None
    for key, label in LOSS_TERMS:
        losses.plot(steps, [h[key] for h in history], label=label, marker=marker)
    similarity.plot(steps, [h["similarity"] for h in history], color="tab:red", label="sum |cos(m_subject, m_style)|",
                    marker=marker)
    for axis, name in ((losses, "loss on each step's batch"), (similarity, "similarity term (x lambda in total)")):
        axis.set_xlabel("step")
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    with warnings.catch_warnings():  # file names outside the font's glyphs are drawn as boxes, not warned about
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
