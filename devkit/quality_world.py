"""A tiny deterministic world of rendered shapes in styles, and two small judges trained on its ground truth.

The merge-quality lab needs pictures whose subject and style are known exactly, and classifiers that say which
subject and which style a generated picture shows. Everything here is plain numpy / PIL / torch (no ComfyUI).

The world (``World(seed)``):
    16 shapes (subjects) and 16 styles, each a ``Concept`` with an English ``name`` and a caption ``token``.
    A render is a square RGB uint8 image, ``SIZE`` = 32 px by default, drawn with PIL at 4x supersampling and
    box-downsampled (antialiasing). Pose (centre offset about +-3 px, span 55-80 % of the image, rotation +-15
    degrees) and pattern phase come from the numpy Generator passed in: a render is a function of
    (shape, style, generator) alone.
    Splits: a seeded permutation of the 16 shapes (``numpy.random.default_rng(seed)``, first draw) and another
    of the 16 styles (second draw); positions 0-5 are ``base``, 6-13 ``lora_train``, 14-15 ``held_out``.
    Base concepts are captioned by their word; the others by a fixed rare token (3 consonants, no vowel, so
    never an English word), the same token for the same concept in every world.
    ``caption(shape, style)`` is ``"a {shape.token} in {style.token} style"``.

The judges (``ShapeJudge`` over the 16 shapes, ``StyleJudge`` over the 16 styles): small CNNs trained on
fresh renders of all 256 (shape, style) pairs with the blur / noise / brightness / shift a small generative
model or autoencoder produces. ``train_judges`` trains both, saves them to one safetensors file and returns
their accuracies; ``load_judges`` reads it back (safetensors only: no pickle).

CLI (writes contact_sheet.png, judges.safetensors and world.json under DIR, prints the accuracies)::

    .host/0.33.0/venv/bin/python devkit/quality_world.py --out DIR [--seed 0 --judge-seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

SIZE = 32
SUPERSAMPLE = 4
KINDS = ("shape", "style")
PARTS = ("base", "lora_train", "held_out")
PART_SIZES = {"base": 6, "lora_train": 8, "held_out": 2}

# Pose ranges, in units of a 32 px image (scaled with ``size``).
OFFSET_PX = 3.0
SPAN = (0.55, 0.80)
ROTATION_DEG = 15.0

# One rare token per concept (shapes first, then styles, in index order): no vowel, so none is an English word.
RARE_TOKENS = (
    "sks", "zwx", "qmv", "vkx", "pqz", "xjw", "bnq", "zvk", "wqj", "jxv", "kqz", "hqv", "fzx", "qxr", "vzj", "xqf",
    "ztq", "jqk", "gxz", "qwv", "zkp", "xvb", "qzm", "wzx", "kxq", "vqp", "zjb", "bxq", "pxz", "jzv", "mqx", "fqz",
)


@dataclass(frozen=True)
class Concept:
    """One shape or style: ``kind`` "shape" | "style", English ``name``, caption ``token``, ``index`` in 0..15."""

    kind: str
    name: str
    token: str
    index: int


# ---------------------------------------------------------------------------------------------------------------
# Shapes: each is a list of (polygon, add) in a canonical frame (x right, y down, about [-1, 1]); a polygon with
# add=False is cut out of what came before it (ring, crescent). Pose normalises the extent, so units are free.


def _arc(cx: float, cy: float, r: float, start_deg: float, end_deg: float, n: int = 48) -> np.ndarray:
    """Points (n, 2) on a circle arc from ``start_deg`` to ``end_deg`` (degrees, y down)."""
    t = np.radians(np.linspace(start_deg, end_deg, n))
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _star() -> np.ndarray:
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 16.0


def _plus(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    return _poly((-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                 (-w, -w))


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return points @ np.array([[c, s], [-s, c]])


def _cup() -> np.ndarray:
    """A U: outer radius 0.9, wall 0.35, open at the top."""
    outer = _arc(0, 0.1, 0.9, 180, 0)  # left wall's foot, round the bottom, to the right wall's foot
    inner = _arc(0, 0.1, 0.55, 0, 180)  # back along the inside
    return np.concatenate([_poly((-0.9, -1)), outer, _poly((0.9, -1), (0.55, -1)), inner, _poly((-0.55, -1))])


SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_arc(0, 0, 1, 0, 360, 72), True)],
    "square": [(_poly((-1, -1), (1, -1), (1, 1), (-1, 1)), True)],
    "triangle": [(_poly((0, -1), (0.866, 0.5), (-0.866, 0.5)), True)],
    "star": [(_star(), True)],
    "plus": [(_plus(), True)],
    "heart": [(_heart(), True)],
    "crescent": [(_arc(0, 0, 1, 0, 360, 72), True), (_arc(0.5, 0, 0.9, 0, 360, 72), False)],
    "ring": [(_arc(0, 0, 1, 0, 360, 72), True), (_arc(0, 0, 0.45, 0, 360, 72), False)],
    "arrow": [(_poly((-1, -0.22), (0.1, -0.22), (0.1, -0.65), (1, 0), (0.1, 0.65), (0.1, 0.22), (-1, 0.22)), True)],
    "ell": [(_poly((-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)), True)],
    "tee": [(_poly((-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)), True)],
    "semicircle": [(_arc(0, 0, 1, 180, 360), True)],
    "diamond": [(_poly((0, -1), (0.5, 0), (0, 1), (-0.5, 0)), True)],
    "bowtie": [(_poly((-1, -0.8), (0, -0.15), (1, -0.8), (1, 0.8), (0, 0.15), (-1, 0.8)), True)],
    "cup": [(_cup(), True)],
    "x": [(_rotate(_plus(), 45), True)],
}
SHAPE_NAMES = tuple(SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# Styles: a palette (background, foreground, second foreground) unique to the style, so colour alone nearly names
# it, plus a fill pattern. Periods are in output pixels (4-6 px: coarser than the blur a decoder adds).


@dataclass(frozen=True)
class _StyleSpec:
    """How one style paints a shape; colours are RGB 0-255, lengths in px of a 32 px picture.

    ``pattern``: solid, hstripes, vstripes, diagonal, antidiagonal, dots, checker, hgradient, vgradient (across
    the shape), outline (hollow: a band of ``stroke`` px inside the silhouette)."""

    pattern: str
    bg: tuple[int, int, int]
    fg: tuple[int, int, int]
    fg2: tuple[int, int, int] | None = None  # the pattern's second colour (gradient end, stripe gap, dot field)
    period: float = 5.0  # px at 32 px
    stroke: float = 0.0  # px at 32 px: the outline width (outline styles) or an edge around a filled style
    edge: tuple[int, int, int] | None = None  # colour of the edge around a filled style


STYLES: dict[str, _StyleSpec] = {
    "ember": _StyleSpec("solid", (28, 24, 36), (255, 122, 24)),
    "frost": _StyleSpec("hstripes", (232, 242, 252), (30, 80, 200), (140, 190, 250), period=4),
    "moss": _StyleSpec("vstripes", (236, 226, 198), (50, 110, 40), (150, 200, 100), period=5),
    "candy": _StyleSpec("dots", (255, 214, 232), (255, 240, 120), (210, 30, 120), period=5),
    "slate": _StyleSpec("outline", (96, 106, 118), (245, 245, 245), stroke=2.5),
    "neon": _StyleSpec("outline", (8, 8, 8), (40, 255, 120), stroke=1),
    "sunset": _StyleSpec("hgradient", (48, 20, 80), (255, 210, 0), (255, 40, 90)),
    "ocean": _StyleSpec("diagonal", (0, 64, 84), (0, 225, 225), (230, 255, 255), period=5),
    "chess": _StyleSpec("checker", (120, 140, 96), (20, 20, 20), (250, 250, 250), period=6),
    "rust": _StyleSpec("solid", (250, 206, 160), (160, 60, 20), stroke=1, edge=(20, 20, 20)),
    "lemon": _StyleSpec("dots", (34, 70, 50), (240, 120, 0), (250, 235, 40), period=6),
    "royal": _StyleSpec("outline", (245, 222, 120), (90, 30, 160), stroke=2.5),
    "mint": _StyleSpec("checker", (205, 250, 228), (0, 120, 100), (110, 210, 180), period=5),
    "cherry": _StyleSpec("outline", (255, 255, 255), (210, 0, 20), stroke=1),
    "cocoa": _StyleSpec("antidiagonal", (104, 62, 32), (255, 232, 190), (200, 150, 90), period=6),
    "sky": _StyleSpec("vgradient", (120, 190, 255), (255, 255, 255), (20, 30, 130)),
}
STYLE_NAMES = tuple(STYLES)


def _pattern_weight(spec: _StyleSpec, xs: np.ndarray, ys: np.ndarray, mask: np.ndarray, phase: np.ndarray,
                    px: float) -> np.ndarray:
    """How much of ``fg2`` (0..1) each hi-res pixel gets. ``xs``/``ys`` are output-pixel coordinates (H, W),
    ``px`` output pixels per 32-px unit, ``phase`` (2,) in [0, 1) periods."""
    period = spec.period * px
    u, v = xs / period + phase[0], ys / period + phase[1]
    if spec.pattern in ("hstripes", "vstripes", "diagonal", "antidiagonal"):
        t = {"hstripes": v, "vstripes": u, "diagonal": (u + v) / math.sqrt(2), "antidiagonal": (u - v) / math.sqrt(2)}
        return (t[spec.pattern] % 1.0 >= 0.5).astype(np.float32)
    if spec.pattern == "checker":
        return ((np.floor(u * 2) + np.floor(v * 2)) % 2).astype(np.float32)
    if spec.pattern == "dots":  # fg dots (radius 0.3 period) on an fg2 field
        return (np.hypot(u % 1.0 - 0.5, v % 1.0 - 0.5) > 0.3).astype(np.float32)
    if spec.pattern in ("hgradient", "vgradient"):  # across the shape's own extent, not the image's
        axis = xs if spec.pattern == "hgradient" else ys
        inside = axis[mask > 0.5]
        lo, hi = (inside.min(), inside.max()) if inside.size else (0.0, 1.0)
        return np.clip((axis - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return np.zeros_like(xs)  # solid, outline


def _stroke_mask(polygons: list[tuple[np.ndarray, bool]], mask: np.ndarray, width_hr: float) -> np.ndarray:
    """Hi-res (H, W) in [0, 1]: the band of ``mask`` within ``width_hr`` hi-res px of its boundary.

    The band round every polygon's boundary is drawn exactly as a disc at each vertex and a quad along each edge
    (PIL's own wide lines leave gaps at the many short edges of a curve), then kept where it is inside the shape."""
    band = Image.new("L", mask.shape[::-1], 0)
    draw = ImageDraw.Draw(band)
    w = width_hr
    for points, _ in polygons:
        ends = np.roll(points, -1, axis=0)
        along = ends - points
        normal = np.stack([-along[:, 1], along[:, 0]], axis=1) * (w / np.maximum(np.hypot(*along.T), 1e-9))[:, None]
        for a, b, n in zip(points, ends, normal):
            draw.polygon([tuple(a + n), tuple(b + n), tuple(b - n), tuple(a - n)], fill=255)
            draw.ellipse([a[0] - w, a[1] - w, a[0] + w, a[1] + w], fill=255)
    return np.minimum(np.asarray(band, dtype=np.float32) / 255.0, mask)


# ---------------------------------------------------------------------------------------------------------------
# The world


def _posed(polygons: list[tuple[np.ndarray, bool]], rotation: float, span: float, centre: np.ndarray,
           canvas: int) -> list[tuple[np.ndarray, bool]]:
    """The polygons rotated by ``rotation`` degrees, scaled so the rotated shape's larger side is ``span`` of the
    canvas (hi-res px), its bounding box centred on ``centre`` (hi-res px)."""
    rotated = [(_rotate(points, rotation), add) for points, add in polygons]
    solid = np.concatenate([points for points, add in rotated if add])
    lo, hi = solid.min(axis=0), solid.max(axis=0)
    scale = span * canvas / float((hi - lo).max())
    return [((points - (lo + hi) / 2) * scale + centre, add) for points, add in rotated]


class World:
    """16 shapes x 16 styles, split by ``seed`` (see the module docstring); renders are ``size`` px square."""

    def __init__(self, seed: int = 0, size: int = SIZE):
        self.seed, self.size = int(seed), int(size)
        rng = np.random.default_rng(self.seed)
        self._parts: dict[str, dict[str, tuple[int, ...]]] = {}
        self._part_of: dict[tuple[str, int], str] = {}
        for kind in KINDS:  # shapes' permutation is drawn first, then styles'
            order = [int(i) for i in rng.permutation(16)]
            bounds = np.cumsum([0] + [PART_SIZES[p] for p in PARTS])
            self._parts[kind] = {p: tuple(sorted(order[a:b])) for p, a, b in zip(PARTS, bounds[:-1], bounds[1:])}
            for part, members in self._parts[kind].items():
                for i in members:
                    self._part_of[(kind, i)] = part
        coords = ((np.arange(self.size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)
        self._grid = tuple(np.meshgrid(coords, coords))  # hi-res pixel centres in output px: (x, y), each (H, W)
        self.shapes = tuple(self._concept("shape", i, name) for i, name in enumerate(SHAPE_NAMES))
        self.styles = tuple(self._concept("style", i, name) for i, name in enumerate(STYLE_NAMES))

    def _concept(self, kind: str, index: int, name: str) -> Concept:
        base = self._part_of[(kind, index)] == "base"
        return Concept(kind, name, name if base else RARE_TOKENS[index + (16 if kind == "style" else 0)], index)

    def concepts(self, kind: str) -> tuple[Concept, ...]:
        """All 16 shapes or styles, in index order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        return self.shapes if kind == "shape" else self.styles

    def split(self, kind: str, part: str) -> tuple[Concept, ...]:
        """The concepts of ``kind`` in ``part`` ("base" 6, "lora_train" 8, "held_out" 2), in index order."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {part!r}")
        return tuple(self.concepts(kind)[i] for i in self._parts[kind][part])

    def part_of(self, concept: Concept) -> str:
        """Which split ``concept`` is in."""
        return self._part_of[(concept.kind, concept.index)]

    def caption(self, shape: Concept, style: Concept) -> str:
        """The training / prompt caption: ``"a {shape.token} in {style.token} style"``."""
        return f"a {shape.token} in {style.token} style"

    def render(self, shape: Concept, style: Concept, rng: np.random.Generator) -> np.ndarray:
        """One picture, (size, size, 3) uint8. Draws from ``rng``, in this order: rotation (+-15 degrees), span
        (the rotated shape's larger side, 55-80 % of the picture), centre offset (2, +-3 px at 32 px), pattern
        phase (2, in periods)."""
        s, hr = SUPERSAMPLE, self.size * SUPERSAMPLE
        px = self.size / 32.0
        rotation = rng.uniform(-ROTATION_DEG, ROTATION_DEG)
        span = rng.uniform(*SPAN)
        offset = rng.uniform(-OFFSET_PX, OFFSET_PX, size=2) * px
        phase = rng.random(2)
        polygons = _posed(SHAPES[shape.name], rotation, span, np.array([hr / 2, hr / 2]) + offset * s, hr)
        canvas = Image.new("L", (hr, hr), 0)
        draw = ImageDraw.Draw(canvas)
        for points, add in polygons:
            draw.polygon([tuple(p) for p in points], fill=255 if add else 0)
        mask = np.asarray(canvas, dtype=np.float32) / 255.0
        hires = self._paint(STYLES[style.name], polygons, mask, phase, px)
        # box filter (antialiasing): sum each s x s block, one axis at a time (faster than one 2-axis mean)
        small = hires.reshape(self.size, s, hr, 3).sum(axis=1).reshape(self.size, self.size, s, 3).sum(axis=2)
        small /= s * s
        return np.clip(np.round(small), 0, 255).astype(np.uint8)

    def _paint(self, spec: _StyleSpec, polygons: list[tuple[np.ndarray, bool]], mask: np.ndarray, phase: np.ndarray,
               px: float) -> np.ndarray:
        """Hi-res colours (H, W, 3) float in [0, 255] for a shape ``mask`` (H, W) in ``spec``'s style."""
        xs, ys = self._grid
        bg, fg = np.array(spec.bg, np.float32), np.array(spec.fg, np.float32)
        if spec.pattern == "outline":
            region, colour = _stroke_mask(polygons, mask, spec.stroke * px * SUPERSAMPLE), fg
        else:
            w = _pattern_weight(spec, xs, ys, mask, phase, px)[..., None]
            colour = fg + (np.array(spec.fg2 or spec.fg, np.float32) - fg) * w
            region = mask
        out = bg + (colour - bg) * region[..., None]
        if spec.edge is not None and spec.pattern != "outline":
            edge = _stroke_mask(polygons, mask, spec.stroke * px * SUPERSAMPLE)[..., None]
            out += (np.array(spec.edge, np.float32) - out) * edge
        return out

    def batch(self, pairs: Sequence[tuple[Concept, Concept]], seed: int | Sequence[int]) -> np.ndarray:
        """Renders of ``pairs`` in order, (N, size, size, 3) uint8, from ``numpy.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        out = np.empty((len(pairs), self.size, self.size, 3), np.uint8)
        for n, (shape, style) in enumerate(pairs):
            out[n] = self.render(shape, style, rng)
        return out

    def all_pairs(self, repeats: int = 1) -> list[tuple[Concept, Concept]]:
        """Every (shape, style) pair ``repeats`` times: shape-major, 256 * repeats pairs."""
        return [(sh, st) for _ in range(repeats) for sh in self.shapes for st in self.styles]

    def describe(self) -> dict:
        """JSON-able: seed, size, caption template, every concept with its token and split, and the splits."""
        def rows(kind: str) -> list[dict]:
            return [{"index": c.index, "name": c.name, "token": c.token, "split": self.part_of(c)}
                    for c in self.concepts(kind)]

        return {
            "seed": self.seed,
            "size": self.size,
            "caption": "a {shape} in {style} style",
            "shapes": rows("shape"),
            "styles": rows("style"),
            "splits": {kind: {part: [c.name for c in self.split(kind, part)] for part in PARTS} for kind in KINDS},
        }


def contact_sheet(world: World, seed: int = 0, zoom: int = 3) -> Image.Image:
    """A labelled 16 x 16 grid (rows: shapes, columns: styles) of one render each, pixels enlarged ``zoom`` x
    (nearest neighbour, so what is seen is what the judges get). Labels: name, and token where it differs."""
    images = world.batch(world.all_pairs(), seed)
    tile, pad, left, top = world.size * zoom, 4, 96, 34
    sheet = Image.new("RGB", (left + 16 * (tile + pad), top + 16 * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for st in world.styles:
        x = left + st.index * (tile + pad)
        draw.text((x, 2), st.name, fill=(0, 0, 0))
        draw.text((x, 16), f"[{st.token}]" if st.token != st.name else "", fill=(120, 120, 120))
    for sh in world.shapes:
        y = top + sh.index * (tile + pad)
        draw.text((4, y + tile // 2 - 12), sh.name, fill=(0, 0, 0))
        draw.text((4, y + tile // 2 + 2), f"[{sh.token}]" if sh.token != sh.name else "", fill=(120, 120, 120))
        for st in world.styles:
            picture = Image.fromarray(images[sh.index * 16 + st.index]).resize((tile, tile), Image.NEAREST)
            sheet.paste(picture, (left + st.index * (tile + pad), y))
    return sheet


# ---------------------------------------------------------------------------------------------------------------
# The judges


class JudgeNet(nn.Module):
    """A small CNN: images (N, 3, H, W) in [0, 1] -> logits (N, classes). Four 3x3 conv + batch-norm + ReLU
    stages (widths w, 2w, 4w, 4w), max-pooled after each of the first three, then a 2 x 2 average pool (keeps
    where things are, coarsely: the shape judge needs layout) and a linear layer."""

    def __init__(self, classes: int = 16, width: int = 16):
        super().__init__()
        widths = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * width * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))  # centred input: the first conv has no bias


def as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pictures as float32 (N, 3, H, W) in [0, 1]. Takes uint8 (N, H, W, 3) or (H, W, 3) (numpy or torch), or
    float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 pictures must be (N, H, W, 3), not {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"float pictures must be (N, 3, H, W) in [0, 1], not {tuple(x.shape)}")
    return x.float()


class Judge:
    """One trained classifier: ``kind`` "shape" or "style", ``classes`` the 16 names in index order."""

    def __init__(self, kind: str, classes: Sequence[str], net: JudgeNet, size: int):
        self.kind, self.classes, self.net, self.size = kind, tuple(classes), net, size

    @torch.no_grad()
    def probabilities(self, images: np.ndarray | torch.Tensor, chunk: int = 512) -> np.ndarray:
        """Class probabilities (N, 16) float32 for pictures ``as_tensor`` takes, ``size`` px square."""
        x = as_tensor(images)
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"the {self.kind} judge reads {self.size} px pictures, not {tuple(x.shape[-2:])}")
        self.net.eval()
        out = [F.softmax(self.net(x[i:i + chunk]), dim=1) for i in range(0, len(x), chunk)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The most probable class index (N,) int64."""
        return self.probabilities(images).argmax(axis=1).astype(np.int64)


class ShapeJudge(Judge):
    """A judge over the 16 shapes (class i is ``World.shapes[i]``)."""

    def __init__(self, net: JudgeNet, size: int = SIZE):
        super().__init__("shape", SHAPE_NAMES, net, size)


class StyleJudge(Judge):
    """A judge over the 16 styles (class i is ``World.styles[i]``)."""

    def __init__(self, net: JudgeNet, size: int = SIZE):
        super().__init__("style", STYLE_NAMES, net, size)


JUDGE_CLASSES = {"shape": ShapeJudge, "style": StyleJudge}


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Each picture of ``x`` (N, 3, H, W) blurred by its own ``sigma`` (N,) or one sigma, in px (0: unchanged).
    A separable 7-tap kernel (enough for sigma <= 1.2), reflected edges."""
    n = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(n)
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # (N*3, 7)
    y = F.pad(x.reshape(1, n * 3, *x.shape[2:]), (3, 3, 3, 3), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * 3)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * 3)
    return y.reshape(x.shape)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a small generative model or autoencoder does to a picture, at random per picture of ``x``
    (N, 3, H, W) in [0, 1]: a 1-px shift (1 in 4), gaussian blur sigma 0.3-1.1 px (1 in 2), brightness
    +-10 % with +-3 % per channel, gaussian noise of std up to 0.04 (1 in 2)."""
    n = x.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    shifted = draw(n) < 0.25
    steps = (draw(n, 2) * 3).floor().long() - 1  # dy, dx in {-1, 0, 1}
    if shifted.any():  # the background is plain, so the wrapped edge row or column is invisible
        x = x.clone()
        for i in torch.nonzero(shifted).flatten().tolist():
            x[i] = torch.roll(x[i], shifts=tuple(steps[i].tolist()), dims=(1, 2))
    sigma = torch.where(draw(n) < 0.5, 0.3 + 0.8 * draw(n), torch.zeros(n))
    x = gaussian_blur(x, sigma)
    gain = (0.9 + 0.2 * draw(n, 1, 1, 1)) * (0.97 + 0.06 * draw(n, 3, 1, 1))
    noise = torch.randn(x.shape, generator=generator) * (0.04 * draw(n, 1, 1, 1)) * (draw(n, 1, 1, 1) < 0.5)
    return (x * gain + noise).clamp(0.0, 1.0)


def render_pool(world: World, per_pair: int, seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (shape, style) pair ``per_pair`` times: pictures (N, size, size, 3) uint8, shape and style class
    indices (N,) int64, N = 256 * per_pair."""
    pairs = world.all_pairs(per_pair)
    shapes = np.array([sh.index for sh, _ in pairs], np.int64)
    styles = np.array([st.index for _, st in pairs], np.int64)
    return world.batch(pairs, seed), shapes, styles


def train_judge(world: World, kind: str, seed: int = 0, *, steps: int = 600, batch_size: int = 64, width: int = 16,
                lr: float = 3e-3, pool: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                per_pair: int = 12) -> Judge:
    """A judge of ``kind`` trained for ``steps`` AdamW steps (one-cycle schedule) on augmented pictures from
    ``pool`` (``render_pool``'s triple; rendered from (seed, 1) with ``per_pair`` when None). Deterministic
    from ``seed`` for a given torch thread count."""
    images, shapes, styles = pool if pool is not None else render_pool(world, per_pair, (seed, 1))
    labels = torch.as_tensor(shapes if kind == "shape" else styles)
    x_all = as_tensor(images)
    torch.manual_seed(seed * 2 + KINDS.index(kind))  # the weights' initialisation
    generator = torch.Generator().manual_seed(seed * 2 + KINDS.index(kind))  # batches and augmentation
    net = JudgeNet(16, width)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=generator)
        loss = F.cross_entropy(net(augment(x_all[idx], generator)), labels[idx], label_smoothing=0.05)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    net.eval()
    return JUDGE_CLASSES[kind](net, world.size)


def accuracy(judge: Judge, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """The share of ``images`` the judge gives their ``labels`` (N,) class, in [0, 1]."""
    return float((judge.predict(images) == np.asarray(labels)).mean())


@dataclass
class Judges:
    """The shape and style judges of one world (``world_seed``, ``size`` px pictures)."""

    shape: Judge
    style: Judge
    world_seed: int
    size: int

    def classify(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(shape indices (N,), style indices (N,)) int64 for pictures ``as_tensor`` takes."""
        return self.shape.predict(images), self.style.predict(images)

    def evaluate(self, world: World, seed: int | Sequence[int], per_pair: int = 4, blur: float = 0.8) -> dict:
        """Accuracies on fresh renders (every pair ``per_pair`` times, from ``seed``), clean and gaussian-blurred
        by ``blur`` px: {"shape": {"clean": a, "blurred": a}, "style": {...}}."""
        images, shapes, styles = render_pool(world, per_pair, seed)
        clean = as_tensor(images)
        blurred = gaussian_blur(clean, blur)
        return {kind: {"clean": accuracy(judge, clean, labels), "blurred": accuracy(judge, blurred, labels)}
                for kind, judge, labels in (("shape", self.shape, shapes), ("style", self.style, styles))}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """One safetensors file: ``shape.*`` and ``style.*`` weights; metadata: world seed, size, widths, classes,
        and ``extra`` (JSON)."""
        tensors = {f"{kind}.{k}": v.detach().contiguous()
                   for kind, judge in (("shape", self.shape), ("style", self.style))
                   for k, v in judge.net.state_dict().items()}
        metadata = {"format": "lorarar-quality-judges", "version": "1", "world_seed": str(self.world_seed),
                    "size": str(self.size), "shape_classes": json.dumps(self.shape.classes),
                    "style_classes": json.dumps(self.style.classes), "shape_width": str(_width(self.shape.net)),
                    "style_width": str(_width(self.style.net)), "extra": json.dumps(extra or {})}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(path).with_name(f".{Path(path).name}.partial")  # a crash never leaves a half file at ``path``
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)


def _width(net: JudgeNet) -> int:
    return net.features[0].out_channels


def load_judges(path: str | Path) -> Judges:
    """The judges ``Judges.save`` wrote (safetensors only: loading runs no pickled code)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "lorarar-quality-judges":
            raise ValueError(f"{path} is not a quality-world judges file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    size = int(meta["size"])
    judges = {}
    for kind in KINDS:
        classes = tuple(json.loads(meta[f"{kind}_classes"]))
        if classes != (SHAPE_NAMES if kind == "shape" else STYLE_NAMES):
            raise ValueError(f"{path}: its {kind} classes {classes} are not this world's")
        net = JudgeNet(len(classes), int(meta[f"{kind}_width"]))
        net.load_state_dict({k[len(kind) + 1:]: v for k, v in tensors.items() if k.startswith(kind + ".")})
        judges[kind] = JUDGE_CLASSES[kind](net.eval(), size)
    return Judges(judges["shape"], judges["style"], int(meta["world_seed"]), size)


def train_judges(world: World, seed: int = 0, out_path: str | Path | None = None, *, steps: int = 600,
                 per_pair: int = 12, width: int = 16, eval_per_pair: int = 4) -> dict:
    """Train both judges on one pool of renders (seed (seed, 1)), evaluate them on fresh ones (seed (seed, 2),
    ``eval_per_pair`` per pair, clean and blurred 0.8 px), save to ``out_path`` when given.

    Returns {"shape": {"clean", "blurred", "seconds"}, "style": {...}, "render_seconds", "train_pictures",
    "eval_pictures", "steps", "seed"}; accuracies in [0, 1], seconds of wall time."""
    start = time.perf_counter()
    pool = render_pool(world, per_pair, (seed, 1))
    report: dict = {"render_seconds": time.perf_counter() - start, "train_pictures": len(pool[0]),
                    "eval_pictures": 256 * eval_per_pair, "steps": steps, "seed": seed}
    trained, seconds = {}, {}
    for kind in KINDS:
        start = time.perf_counter()
        trained[kind] = train_judge(world, kind, seed, steps=steps, width=width, pool=pool)
        seconds[kind] = time.perf_counter() - start
    judges = Judges(trained["shape"], trained["style"], world.seed, world.size)
    for kind, accuracies in judges.evaluate(world, (seed, 2), eval_per_pair).items():
        report[kind] = {**accuracies, "seconds": seconds[kind]}
    if out_path is not None:
        judges.save(out_path, extra=report)
    return report


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI: contact sheet, judges and their accuracies under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for contact_sheet.png, judges, world.json")
    parser.add_argument("--seed", type=int, choices=range(0, 2**32), metavar="0..2**32-1", default=0,
                        help="the world's seed (splits)")
    parser.add_argument("--judge-seed", type=int, default=0, help="renders, initialisation and batches")
    parser.add_argument("--steps", type=positive, default=600, help="training steps per judge (batches of 64)")
    parser.add_argument("--per-pair", type=positive, default=12, help="training renders per (shape, style) pair")
    parser.add_argument("--threads", type=positive, default=1, help="torch CPU threads")
    parser.add_argument("--no-judges", action="store_true", help="only the contact sheet and world.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = World(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    contact_sheet(world, seed=args.judge_seed).save(args.out / "contact_sheet.png")
    summary: dict = {"world": world.describe()}
    if not args.no_judges:
        report = train_judges(world, args.judge_seed, args.out / "judges.safetensors", steps=args.steps,
                              per_pair=args.per_pair)
        summary["judges"] = report
        for kind in KINDS:
            r = report[kind]
            print(f"{kind} judge: clean {r['clean']:.2%}, blurred (sigma 0.8 px) {r['blurred']:.2%}, "
                  f"trained in {r['seconds']:.1f} s on {args.threads} thread(s)")
        print(f"renders: {report['train_pictures']} for training in {report['render_seconds']:.1f} s, "
              f"{report['eval_pictures']} for evaluation")
    (args.out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
