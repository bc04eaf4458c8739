"""The trained hypernetwork as a .safetensors file the Hypernet Loader reads like a published checkpoint.

Tensors as the published ones (``input_<k>.weight/bias``, one per attention width, k = 1 for the smallest;
``output.1.weight/bias``), float32, and string metadata: lorarar_model_classes, lorarar_widths, lorarar_pairs,
lorarar_recipe, lorarar_steps, lorarar_pack_version, lorarar_base_model.

Interim: helper "hfiles" adds ``new_hypernet`` / ``save_hypernet`` to hypernet/model.py; until they are on main,
training creates and writes the network through the two functions here (one place to switch at the merge).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import LoraRarError
from ..files import atomic_file, check_target
from ..model import MODEL_CLASSES_KEY, LoraRarHypernet
from .state import STATE_FILE

LOG_FILE = "log.jsonl"  # the run folder's JSONL log (trainer.py writes it)


def new_hypernet(widths: list[int], hidden: int = 128, seed: int = 0) -> LoraRarHypernet:
    """A freshly initialised H with one input layer per attention width (input_1 for the smallest), torch's default
    Linear init drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoraRarHypernet({f"input_{k}": 2 * width for k, width in enumerate(sorted(set(widths)), start=1)}, hidden)


def training_metadata(*, model_classes: list[str], widths: list[int], pairs: list[tuple[str, str]], recipe_json: str,
                      steps: int, base_model: str) -> dict[str, str]:
    return {
        MODEL_CLASSES_KEY: ",".join(model_classes),
        "lorarar_widths": ",".join(str(w) for w in sorted(widths)),
        "lorarar_pairs": json.dumps([f"{subject}+{style}" for subject, style in pairs]),
        "lorarar_recipe": recipe_json,
        "lorarar_steps": str(steps),
        "lorarar_pack_version": __version__,
        "lorarar_base_model": base_model,
    }


def run_dir_for(out: Path) -> Path:
    """The run folder beside the output: checkpoint (state.pt), log (log.jsonl), encoded dataset."""
    return out.parent / (out.name + ".training")


def refuse_existing(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: never replace --out without --overwrite; a run folder with a checkpoint needs --resume
    (continue) or --overwrite (start over: its checkpoint and log are removed)."""
    check_target(out)
    if out.exists() and not overwrite:
        raise LoraRarError(f"{out}: file exists; pass --overwrite to replace it or choose another --out")
    state = run_dir_for(out) / STATE_FILE
    if not resume and state.exists():
        if not overwrite:
            raise LoraRarError(f"{state.parent}: holds a training checkpoint; pass --resume to continue it or "
                               "--overwrite to start over")
        for stale in (STATE_FILE, LOG_FILE):
            (state.parent / stale).unlink(missing_ok=True)


def write_hypernet(net: LoraRarHypernet, path: str | Path, metadata: dict[str, str], *, overwrite: bool = False) -> Path:
    """Write H's tensors (float32, contiguous, on the CPU) and ``metadata`` atomically; never replaces an existing
    file unless ``overwrite``."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in net.state_dict().items()}
    with atomic_file(path, overwrite=overwrite) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return Path(path)
