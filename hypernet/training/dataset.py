"""The training dataset layout (docs/TRAINING.md) and its checks.

::

    <dataset>/
      split.json   {"train": {"subjects": [...], "styles": [...]}, "validation": {"subjects": [...], "styles": [...]}}
      subjects/<name>/lora.safetensors   the subject LoRA
      subjects/<name>/caption.txt        one line: the prompt the LoRA was trained with
      subjects/<name>/images/            its training images (*.png, *.jpg, *.jpeg, *.webp), at least one
      styles/<name>/...                  the same for each style LoRA

Training pairs are train subjects x train styles; validation pairs validation subjects x validation styles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LoraRarError
from ..keys import attention_role
from ..layers import LoraFile, LowRankLayer
from ..lora_io import read_lora
from ..methods.lorarar import HYPERNET_ROLES

KINDS = ("subjects", "styles")
SPLITS = ("train", "validation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LORA_FILE, CAPTION_FILE, IMAGES_DIR, SPLIT_FILE = "lora.safetensors", "caption.txt", "images", "split.json"
# A caption is one prompt; ComfyUI encodes any length in 77-token chunks, so a runaway file (a pasted log, 1 MB of
# tags) would become thousands of chunks the cross-attention of every training step attends over.
MAX_CAPTION_CHARS = 4000


@dataclass(frozen=True)
class Entry:
    """One subject or style: its LoRA file, caption and training images."""

    kind: str  # "subjects" or "styles"
    name: str
    lora: Path
    caption: str
    images: tuple[Path, ...]


@dataclass(frozen=True)
class LoraCheck:
    """How each dataset LoRA is read and checked, once per run, so each of its problems is listed once.

    read: the LoRA's layers (raises LoraRarError naming the file): torch alone by default, through a base model's key
    map for check-dataset --base (nodes/adapter/training.py). misfit: why a LoRA that reads still cannot train on that model
    (one line naming the file), or None; no model, no such check.
    """

    read: Callable[[Path], LoraFile] = read_lora
    misfit: Callable[[LoraFile], str | None] | None = None


FILES_ONLY = LoraCheck()


@dataclass
class Dataset:
    root: Path
    entries: dict[tuple[str, str], Entry]  # (kind, name) -> entry
    split: dict[str, dict[str, list[str]]]  # split -> kind -> names
    problems: list[str] = field(default_factory=list)

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(subject, style) names of one split, subjects outer, both in the split file's order."""
        return [(subject, style) for subject in self.split[split]["subjects"] for style in self.split[split]["styles"]]

    def entry(self, kind: str, name: str) -> Entry:
        return self.entries[(kind, name)]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_split(root: Path, problems: list[str]) -> dict[str, dict[str, list[str]]]:
    """split.json as split -> kind -> names; every defect appended to ``problems`` (empty lists in its place)."""
    empty = {split: {kind: [] for kind in KINDS} for split in SPLITS}
    path = root / SPLIT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path}: split file missing (expected {{\"train\": {{\"subjects\": [...], \"styles\": [...]}}, "
                        f"\"validation\": {{...}}}})")
        return empty
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problems.append(f"{path}: not readable JSON ({error})")
        return empty
    except RecursionError:  # nesting deeper than the JSON decoder recurses
        problems.append(f"{path}: not readable JSON (nested too deeply)")
        return empty
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object with \"train\" and \"validation\"")
        return empty
    for split in SPLITS:
        part = data.get(split, {} if split == "validation" else None)
        if not isinstance(part, dict):
            problems.append(f"{path}: \"{split}\" missing or not an object with \"subjects\" and \"styles\" lists")
            continue
        for kind in KINDS:
            names = part.get(kind, [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                problems.append(f"{path}: {split}.{kind} must be a list of names")
                continue
            if len(set(names)) != len(names):
                problems.append(f"{path}: {split}.{kind} lists a name twice")
            empty[split][kind] = list(dict.fromkeys(names))
    for kind in KINDS:
        if not empty["train"][kind]:
            problems.append(f"{path}: train.{kind} is empty: training needs at least one subject and one style")
        both = sorted(set(empty["train"][kind]) & set(empty["validation"][kind]))
        if both:
            problems.append(f"{path}: {kind} {', '.join(both)} in both train and validation (a held-out name must not be trained on)")
    return empty


def read_rgb(path: Path):
    """A training image as an 8-bit RGB PIL image. 16-bit greyscale (PNG "I;16") is scaled to 8 bits first:
    PIL's convert("RGB") clips it, so anything brighter than 255 / 65535 would become white."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as handle:
        if handle.mode.startswith("I;16"):
            grey = np.asarray(handle, dtype=np.float32) / 257.0
            return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
        image = handle.convert("RGB")
        image.load()
        return image


def _check_entry(entry: Entry, problems: list[str], loras: LoraCheck) -> set[int]:
    """Checks one entry's caption, images and LoRA (read once, by ``loras``); returns the attention widths its LoRA
    patches (none for a LoRA already reported)."""
    from PIL import Image, UnidentifiedImageError

    folder = entry.lora.parent
    if not entry.caption:
        problems.append(f"{folder / CAPTION_FILE}: caption missing or empty (one line: the prompt the LoRA was trained with)")
    elif len(entry.caption) > MAX_CAPTION_CHARS:
        problems.append(f"{folder / CAPTION_FILE}: caption of {len(entry.caption)} characters (at most {MAX_CAPTION_CHARS}): "
                        "one line, the prompt the LoRA was trained with")
    if not entry.images:
        problems.append(f"{folder / IMAGES_DIR}: no training image ({', '.join(IMAGE_SUFFIXES)})")
    for image in entry.images:
        try:
            read_rgb(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            problems.append(f"{image}: not a decodable image ({error})")
    if not entry.lora.is_file():
        problems.append(f"{entry.lora}: LoRA file missing")
        return set()
    try:
        lora = loras.read(entry.lora)
    except LoraRarError as error:
        problems.append(str(error))
        return set()
    misfit = loras.misfit(lora) if loras.misfit is not None else None
    if misfit:
        problems.append(misfit)
        return set()
    widths = {layer.d_out for name, layer in lora.layers.items()
              if isinstance(layer, LowRankLayer) and attention_role(name) in HYPERNET_ROLES}
    if not widths:
        problems.append(f"{entry.lora}: no attention layer (to_q / to_out.0) of the diffusion model: nothing for the hypernet to merge")
    return widths


def _entry(root: Path, kind: str, name: str) -> Entry:
    folder = root / kind / name
    try:
        caption = (folder / CAPTION_FILE).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError):
        caption = []
    return Entry(kind, name, folder / LORA_FILE, caption[0].strip() if caption else "", tuple(_image_files(folder / IMAGES_DIR)))


def read_dataset(path: str | Path, *, check_files: bool = True, loras: LoraCheck = FILES_ONLY) -> Dataset:
    """The dataset at ``path`` with every problem found (``Dataset.problems``, one line each naming the file).

    check_files: also open every LoRA and image (what check-dataset does); False checks the layout only.
    loras: how each LoRA is read and checked (default: the file alone; check-dataset --base: against the model).
    """
    root = Path(path)
    problems: list[str] = []
    if not root.is_dir():
        return Dataset(root, {}, {s: {k: [] for k in KINDS} for s in SPLITS}, [f"{root}: dataset folder not found"])
    split = _read_split(root, problems)
    entries: dict[tuple[str, str], Entry] = {}
    widths: dict[str, dict[str, set[int]]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        listed = {name for part in split.values() for name in part[kind]}
        present = {p.name for p in (root / kind).iterdir() if p.is_dir()} if (root / kind).is_dir() else set()
        for name in sorted(present - listed):
            problems.append(f"{root / kind / name}: not in {SPLIT_FILE} (add it to train or validation, or remove it)")
        for name in sorted(listed):
            if name not in present:
                problems.append(f"{root / kind / name}: named in {SPLIT_FILE} but the folder is missing")
                continue
            entries[(kind, name)] = entry = _entry(root, kind, name)
            if check_files:
                widths[kind][name] = _check_entry(entry, problems, loras)
            for extra in sorted(p for p in (root / kind / name).glob("*.safetensors") if p.name != LORA_FILE):
                problems.append(f"{extra}: extra LoRA file (each folder holds one LoRA, named {LORA_FILE})")
    subject_widths = set().union(*widths["subjects"].values()) if widths["subjects"] else set()
    style_widths = set().union(*widths["styles"].values()) if widths["styles"] else set()
    for kind, own, other in (("subjects", subject_widths, style_widths), ("styles", style_widths, subject_widths)):
        for name, found in widths[kind].items():
            if found and other and not found & other:
                problems.append(f"{entries[(kind, name)].lora}: patches attention widths {sorted(found)}, the "
                                f"{'styles' if kind == 'subjects' else 'subjects'} patch {sorted(other)}: made for another base model")
    return Dataset(root, entries, split, problems)


def check_dataset(path: str | Path, loras: LoraCheck = FILES_ONLY) -> list[str]:
    """Every problem of the dataset at ``path``, one line each naming the file; [] when it is usable."""
    return read_dataset(path, loras=loras).problems


def load_dataset(path: str | Path) -> Dataset:
    """The dataset, or LoraRarError with its first problem (and how many more) when it is not usable."""
    dataset = read_dataset(path)
    if dataset.problems:
        more = f" (and {len(dataset.problems) - 1} more problems: run `python -m hypernet check-dataset {path}`)" \
            if len(dataset.problems) > 1 else ""
        raise LoraRarError(dataset.problems[0] + more)
    return dataset
