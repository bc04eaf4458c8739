"""The training settings, with the published recipe (LoRA.rar, arXiv 2412.05148; docs/TRAINING.md lists it) as defaults."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from ..errors import LoraRarError
from ..ziplora import DEFAULT_LAMBDA

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained numbers (kept in the checkpoint and the output's metadata).

    The reference trains with bitsandbytes' 8-bit AdamW on the GPU; this is torch's AdamW in float32 (the
    hypernetwork has 0.5 M parameters, so the 8-bit optimizer state saves a few MB and is left out).
    """

    learning_rate: float = 0.01
    weight_decay: float = 1e-4
    similarity_lambda: float = DEFAULT_LAMBDA
    grad_clip: float = 1.0  # max total gradient norm
    epochs: int = 100  # one pair (per batch slot) drawn per epoch
    steps_per_pair: int = 5  # optimiser steps per epoch, each on a fresh image / noise / timestep draw
    batch_pairs: int = 1  # pairs per rank per step; effective batch = world size x batch_pairs
    seed: int = 0
    resolution: int = 1024  # images resized (shorter side) then randomly cropped to this many pixels
    mixed_precision: str = "no"  # "fp16" / "bf16": autocast of the model forward (GPU); H stays float32
    gradient_checkpointing: bool = False  # recompute the transformer blocks in backward (GPU memory)
    fixed_style_prompt: str | None = None  # the reference's defect, for comparison: one prompt for every style
    hidden: int = 128  # H's hidden units (a new network; a fine-tuned one keeps its own)

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise LoraRarError(f"mixed precision {self.mixed_precision!r}: one of {', '.join(MIXED_PRECISION)}")
        for name in ("epochs", "steps_per_pair", "batch_pairs", "resolution", "hidden"):
            if getattr(self, name) < 1:
                raise LoraRarError(f"{name} must be at least 1 (got {getattr(self, name)})")
        numbers = {"learning rate": self.learning_rate, "weight decay": self.weight_decay,
                   "lambda": self.similarity_lambda, "grad clip": self.grad_clip}
        for name, value in numbers.items():  # NaN passes every comparison below; inf trains to NaN
            if not math.isfinite(value):
                raise LoraRarError(f"{name} {value}: must be a finite number")
        if self.learning_rate <= 0 or self.grad_clip <= 0 or self.weight_decay < 0 or self.similarity_lambda < 0:
            raise LoraRarError("learning rate and grad clip must be > 0, weight decay and lambda >= 0")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_pair

    def to_json(self, world_size: int = 1) -> str:
        return json.dumps({**asdict(self), "effective_batch_pairs": world_size * self.batch_pairs,
                           "optimizer": "torch.optim.AdamW", "scheduler": "constant"}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# What may differ between a checkpoint and a resumed run without changing the numbers already trained on.
RESUMABLE_CHANGES = ("epochs",)


def resume_mismatch(saved: "Recipe", now: "Recipe", saved_world: int, world: int) -> str | None:
    """Why a checkpoint cannot continue under ``now`` (the first differing setting), or None."""
    for f in fields(Recipe):
        if f.name in RESUMABLE_CHANGES or f.name == "batch_pairs":
            continue
        if getattr(saved, f.name) != getattr(now, f.name):
            return f"{f.name} was {getattr(saved, f.name)!r}, now {getattr(now, f.name)!r}"
    if saved.batch_pairs * saved_world != now.batch_pairs * world:
        return (f"effective batch was {saved_world} x {saved.batch_pairs} pairs, now {world} x {now.batch_pairs} "
                "(keep world size x --batch-pairs equal)")
    return None
