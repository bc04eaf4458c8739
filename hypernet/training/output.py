"""The trained hypernetwork as a .safetensors file the Hypernet Loader reads like a published checkpoint.

Tensors as the published ones (``input_<k>.weight/bias``, one per attention width, k = 1 for the smallest;
``output.1.weight/bias``), float32, and string metadata: lorarar_model_classes, lorarar_widths, lorarar_pairs,
lorarar_recipe, lorarar_steps, lorarar_pack_version, lorarar_base_model, lorarar_unet_layout.

The network is made and written by hypernet/model.py (``new_hypernet``, ``save_hypernet``); this module holds what
training adds: the metadata it records, the run folder and the refusal to replace files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import LoraRarError
from ..files import check_target
from ..base_models import UNetLayout
from ..model import LAYOUT_KEY, MODEL_CLASSES_KEY
from .state import STATE_FILE

LOG_FILE = "log.jsonl"  # the run folder's JSONL log (trainer.py writes it)


def training_metadata(*, model_classes: list[str], widths: list[int], pairs: list[tuple[str, str]], recipe_json: str,
                      steps: int, base_model: str, layout: UNetLayout | None = None) -> dict[str, str]:
    """layout: the base model's UNet layout (None for a model that is no UNet): recorded so the command line, which
    has no model, reads the LoRAs this hypernet merges as that model names their layers."""
    metadata = {
        MODEL_CLASSES_KEY: ",".join(model_classes),
        "lorarar_widths": ",".join(str(w) for w in sorted(widths)),
        "lorarar_pairs": json.dumps([f"{subject}+{style}" for subject, style in pairs]),
        "lorarar_recipe": recipe_json,
        "lorarar_steps": str(steps),
        "lorarar_pack_version": __version__,
        "lorarar_base_model": base_model,
    }
    if layout is not None:
        metadata[LAYOUT_KEY] = json.dumps(layout.as_dict(), sort_keys=True)
    return metadata


def run_dir_for(out: Path) -> Path:
    """The run folder beside the output: checkpoint (state.pt), log (log.jsonl), encoded dataset."""
    return out.parent / (out.name + ".training")


def refuse_existing(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: never replace --out without --overwrite; a run folder with a checkpoint needs --resume
    (continue) or --overwrite (start over: its checkpoint and log are removed)."""
    check_target(out)
    if out.suffix != ".safetensors":  # save_hypernet refuses it too, but only after the whole run
        raise LoraRarError(f"{out}: the hypernet is written as .safetensors; name it <name>.safetensors")
    if out.exists() and not overwrite:
        raise LoraRarError(f"{out}: file exists; pass --overwrite to replace it or choose another --out")
    state = run_dir_for(out) / STATE_FILE
    if not resume and state.exists():
        if not overwrite:
            raise LoraRarError(f"{state.parent}: holds a training checkpoint; pass --resume to continue it or "
                               "--overwrite to start over")
        for stale in (STATE_FILE, LOG_FILE):
            (state.parent / stale).unlink(missing_ok=True)
