"""Training checkpoints that resume exactly: H, the optimizer, the grad scaler, every RNG state, the position.

One file (``state.pt`` in the run folder), written atomically (a temp file beside it, then a rename) and read
back with ``torch.load(weights_only=True)``: only tensors, numbers, strings, lists, tuples and dicts inside.
The pair sequence and the per-step draws derive from (seed, step, slot), so the step number is the position
in them; the global RNG states are saved too, for whatever else draws from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraRarError
from ..files import atomic_file

FORMAT = 1
STATE_FILE = "state.pt"


def rng_states() -> dict:
    """python, numpy, torch (CPU and every CUDA device) RNG states in weights_only-loadable types."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Checkpoint:
    step: int  # optimiser steps done; the next step is this one (0-based)
    hypernet: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict
    rng: dict
    recipe: str  # Recipe JSON
    world_size: int
    pairs: list[list[str]]  # the training pairs, in order (the sequence indexes them)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    path = Path(folder) / STATE_FILE
    payload = {"format": FORMAT, "step": checkpoint.step, "hypernet": checkpoint.hypernet, "optimizer": checkpoint.optimizer,
               "scaler": checkpoint.scaler, "rng": checkpoint.rng, "recipe": checkpoint.recipe,
               "world_size": checkpoint.world_size, "pairs": checkpoint.pairs}
    with atomic_file(path) as temp:
        torch.save(payload, temp)
    return path


def load_checkpoint(folder: Path) -> Checkpoint:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise LoraRarError(f"{path}: no training checkpoint to resume from (run without --resume to start)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: one line naming it
        text = str(error).strip()
        reason = f"{type(error).__name__}: {(text.splitlines() or [''])[0][:200]}"
        if "weights_only" in text or "Unsupported global" in text:  # torch's text advises weights_only=False: never
            reason = "it holds more than tensors, numbers and strings; refused (only weights_only=True loads)"
        raise LoraRarError(f"{path}: not a readable training checkpoint ({reason}); start over with --overwrite "
                           "if it cannot be restored") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LoraRarError(f"{path}: not a training checkpoint of format {FORMAT}")
    return Checkpoint(payload["step"], payload["hypernet"], payload["optimizer"], payload["scaler"], payload["rng"],
                      payload["recipe"], payload["world_size"], payload["pairs"])
