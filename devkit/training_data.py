"""A synthetic hypernet-training dataset in the layout ``python -m hypernet train`` reads (docs/TRAINING.md, "1. The dataset").

    <root>/split.json                       {"train": {"subjects": [...], "styles": [...]},
                                             "validation": {"subjects": [...], "styles": [...]}}
    <root>/subjects/<name>/lora.safetensors random attention LoRA (to_q, to_k, to_v, to_out.0 of attn1 and attn2)
    <root>/subjects/<name>/caption.txt      one line, e.g. "a photo of sks1 toy"
    <root>/subjects/<name>/images/*.png     a few small pictures: one colour and one shape per subject
    <root>/styles/<name>/...                the same; styles are stripes or checks in two colours

Everything follows from ``seed``: the same call writes the same bytes. The LoRAs are shaped for the layout
given (``sd15_layout()`` for the synthetic SD 1.5 checkpoint of devkit/synthetic_models.py).

CLI::

    .host/0.33.0/venv/bin/python devkit/training_data.py OUT [--subjects 3 --styles 3 --images 2 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from devkit import synthetic_models  # noqa: E402
from devkit.loras import random_lora, write_lora  # noqa: E402
from hypernet.base_models import UNetLayout  # noqa: E402

SHAPES = ("square", "disc", "cross")
PATTERNS = ("stripes", "checks")


def sd15_layout() -> UNetLayout:
    """The attention layout of the synthetic SD 1.5 checkpoint (widths 320, 640, 1280; context 768)."""
    return UNetLayout.from_unet_config(synthetic_models.SD15_MODEL_CLASS, synthetic_models.SD15_UNET_CONFIG)


def _colour(generator: torch.Generator) -> torch.Tensor:
    """An RGB colour (3,) in [0, 255], not too dark, so the pictures differ visibly."""
    return 60 + torch.rand(3, generator=generator) * 195


def subject_image(size: int, colour: torch.Tensor, shape: str, generator: torch.Generator) -> Image.Image:
    """A grey background with one coloured shape, placed and sized at random."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (0.3 + 0.4 * torch.rand(2, generator=generator)) * size
    radius = (0.15 + 0.15 * torch.rand(1, generator=generator)).item() * size
    dy, dx = (ys - centre[0]).abs(), (xs - centre[1]).abs()
    if shape == "square":
        mask = (dy < radius) & (dx < radius)
    elif shape == "disc":
        mask = dy ** 2 + dx ** 2 < radius ** 2
    else:
        mask = ((dy < radius / 3) & (dx < radius)) | ((dx < radius / 3) & (dy < radius))
    pixels = torch.full((size, size, 3), 128.0)
    pixels[mask] = colour
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def style_image(size: int, colours: tuple[torch.Tensor, torch.Tensor], pattern: str,
                generator: torch.Generator) -> Image.Image:
    """Two colours in stripes or checks with a random period and phase."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    period = int(torch.randint(4, max(5, size // 4), (1,), generator=generator))
    phase = int(torch.randint(0, period, (1,), generator=generator))
    bands = ((xs + phase) // period) % 2
    if pattern == "checks":
        bands = (bands + ((ys + phase) // period) % 2) % 2
    pixels = torch.where(bands[..., None].bool(), colours[0], colours[1])
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _write_entry(folder: Path, lora: dict, caption: str, images: list[Image.Image]) -> None:
    write_lora(folder / "lora.safetensors", lora)
    (folder / "caption.txt").write_text(caption + "\n")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / "images" / f"{index:02d}.png")


def build_dataset(root: str | Path, layout: UNetLayout | None = None, *, subjects: int = 3, styles: int = 3,
                  validation_subjects: int = 1, validation_styles: int = 1, images: int = 2, image_size: int = 64,
                  rank: int = 4, std: float = 0.05, fmt: str = "kohya", seed: int = 0) -> Path:
    """Write a dataset of ``subjects`` subject and ``styles`` style LoRAs under ``root`` and return ``root``.

    The last ``validation_subjects`` subjects and ``validation_styles`` styles form the validation split, the
    others the training split (each split needs at least one of each kind). ``layout`` defaults to the
    synthetic SD 1.5 one; ``rank``, ``std`` (of both factors' entries) and ``fmt`` (a devkit.loras format) shape
    the random LoRAs, ``images`` PNGs of ``image_size`` pixels go with each.
    """
    layout = layout or sd15_layout()
    for kind, total, held_out in (("subjects", subjects, validation_subjects), ("styles", styles, validation_styles)):
        if not 1 <= held_out < total:
            raise ValueError(f"{total} {kind} with {held_out} for validation leaves no training or validation {kind}")
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    subject_names = [f"subject_{i}" for i in range(subjects)]
    style_names = [f"style_{i}" for i in range(styles)]
    for i, name in enumerate(subject_names):
        colour, shape = _colour(generator), SHAPES[i % len(SHAPES)]
        pictures = [subject_image(image_size, colour, shape, generator) for _ in range(images)]
        lora = random_lora(layout, rank=rank, seed=seed * 1000 + i, fmt=fmt, alpha=float(rank), std=std)
        _write_entry(root / "subjects" / name, lora, f"a photo of sks{i} {shape}", pictures)
    for i, name in enumerate(style_names):
        colours, pattern = (_colour(generator), _colour(generator)), PATTERNS[i % len(PATTERNS)]
        pictures = [style_image(image_size, colours, pattern, generator) for _ in range(images)]
        lora = random_lora(layout, rank=rank, seed=seed * 1000 + 500 + i, fmt=fmt, alpha=float(rank), std=std)
        _write_entry(root / "styles" / name, lora, f"a picture in zkx{i} {pattern} style", pictures)
    split = {
        "train": {"subjects": subject_names[:subjects - validation_subjects],
                  "styles": style_names[:styles - validation_styles]},
        "validation": {"subjects": subject_names[subjects - validation_subjects:],
                       "styles": style_names[styles - validation_styles:]},
    }
    (root / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="dataset folder to write")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--styles", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="pictures per LoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = build_dataset(args.out, subjects=args.subjects, styles=args.styles, images=args.images, seed=args.seed)
    print(json.loads((root / "split.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
