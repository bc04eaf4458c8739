"""What the nodes output beside models: the merged LoRA saved as a file in the loras folder, and the coefficient
picture of a merge."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
import numpy
import torch

from ...hypernet import __version__
from ...hypernet.coefficients import coefficient_picture, overall, summarize, summary_lines
from ...hypernet.errors import LoraRarError, LoraRarFileExists
from ...hypernet.files import check_name_characters, check_target
from ...hypernet.lora_io import SAVE_DTYPES, save_lora

IF_EXISTS = ("add number", "error", "overwrite")


def target_path(name: str, check: bool = True) -> Path:
    """The file for ``name`` inside the first loras folder; refuses names that leave that folder, names with
    control characters, no file name (``folder/``, ``.``, ``..``) and names too long for the file system.

    The check is lexical (no symlink resolution), so subfolders the user linked into loras stay usable.
    """
    check_name_characters(name)  # before strip(): a trailing newline is refused, not quietly dropped
    root = Path(os.path.abspath(folder_paths.get_folder_paths("loras")[0]))
    name = name.strip()
    stem = name.removesuffix(".safetensors")
    if not re.split(r"[\\/]", stem)[-1].strip(" ."):
        raise LoraRarError(f"{name or repr(name)}: no file name for the merged LoRA; give a name such as lorarar/merged")
    name = stem + ".safetensors"
    path = Path(os.path.normpath(root / name))
    if os.path.isabs(name) or root not in path.parents:
        raise LoraRarError(f"{name}: the merged LoRA must be saved inside the loras folder {root}")
    return check_target(path) if check else path


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}_{number:05d}.safetensors")


def save_merged(merged_lora, file_name: str, dtype: str, if_exists: str) -> str:
    """Write the merged LoRA into the loras folder; returns the path written (numbered, replaced or refused as
    ``if_exists`` says)."""
    merged_lora.check_savable()  # a sampling-time merge (k-lora) is no single file: say so before any name check
    if if_exists not in IF_EXISTS:
        raise LoraRarError(f"if_exists must be one of {', '.join(IF_EXISTS)}, not {if_exists!r}")
    # with "add number" a folder may hold the name (the next number is taken): each candidate is checked
    path = target_path(file_name, check=if_exists != "add number")
    if if_exists == "add number":  # the longest numbered name must fit too, not only the first one
        check_target(_numbered(path, 99_999))
    state_dict = merged_lora.kohya_state_dict(SAVE_DTYPES[dtype])
    metadata = merged_lora.metadata(__version__)
    candidates = [path] if if_exists != "add number" else [path, *(_numbered(path, n) for n in range(1, 100_000))]
    for candidate in candidates:
        if if_exists == "add number" and os.path.lexists(candidate):  # a file, folder or link: next number
            continue
        try:
            save_lora(candidate, state_dict, metadata, overwrite=if_exists == "overwrite",
                      protect=merged_lora.source_paths)
        except LoraRarFileExists:
            if if_exists != "add number":
                raise
            continue  # appeared meanwhile: take the next number
        return str(candidate)
    raise LoraRarError(f"{path}: no free numbered name left beside it")


def _no_coefficients(merged) -> str:
    report = merged.report
    if report.hypernet:  # a hypernet method whose layers all went elsewhere (or were left out as misfits)
        return (f"{report.subject} + {report.style}: made with {report.method}, but no layer went through the "
                "hypernet (see the merge report), so there are no per-column coefficients to draw")
    return (f"made with {report.method}: it has no per-column coefficients; the picture needs lorarar (or zip-lora)")


def coefficient_outputs(merged) -> tuple:
    """(IMAGE (1, H, W, 3) in [0, 1], summary text) of a merge's per-column coefficients."""
    if not merged.coefficients:
        raise LoraRarError(_no_coefficients(merged))
    report = merged.report
    picture = coefficient_picture(merged.coefficients, f"{report.method}: {report.subject} + {report.style}")
    image = torch.from_numpy(numpy.asarray(picture, dtype=numpy.float32) / 255.0)[None]
    everything = overall(merged.coefficients)
    summary = "\n".join([
        f"{report.method}: {report.subject} + {report.style}",
        f"all {everything.layers} layers: subject mean {everything.subject_mean:.3f}, style mean "
        f"{everything.style_mean:.3f}, style dominates {everything.style_dominant:.1%} of columns",
        *summary_lines(summarize(merged.coefficients))])
    return image, summary
