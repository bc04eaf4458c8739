"""The LoRA.rar training loop: H produces every layer's coefficients each step, the ZipLoRA objective trains it.

Per step and per pair (subject LoRA, style LoRA) in the rank's batch:

1. H (``FactoredHypernet``, differentiable) gives each to_q / to_out.0 layer both LoRAs patch its (d_in, 2)
   column coefficients from the factors; ``ZipLoraLayer.use_coefficients`` hands them to the injected branch.
   to_k / to_v (and any other layer both patch) are summed: coefficients fixed at 1, no gradient.
2. ``ziplora_loss`` on one subject draw and one style draw (image crop, noise, timestep; the same for the merged
   branch and its single-LoRA target), with lambda x SUM |cos| as published.
3. backward (DDP all-reduces), grad-norm clip, AdamW step.

The model forward, the draws and the injection come from a :class:`Task` (nodes/adapter/training.py: ComfyUI's model).
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LoraRarError
from ..keys import attention_role
from ..layers import LowRankLayer
from ..methods.lorarar import HYPERNET_ROLES, FactoredHypernet
from ..model import LoraRarHypernet
from ..ziplora import ZipLoraMerge, ziplora_loss
from . import distributed
from .distributed import World
from .output import LOG_FILE
from .recipe import Recipe, resume_mismatch
from .state import Checkpoint, load_checkpoint, restore_rng_states, rng_states, save_checkpoint

VALIDATION_SEED_STEP = 2**31 - 1  # the "step" of the fixed validation draws: never a training step


class Task(Protocol):
    """What the loop needs from the model side (nodes/adapter/training.py implements it on a ComfyUI MODEL)."""

    device: torch.device

    def layers(self, kind: str, name: str) -> dict[str, LowRankLayer]:
        """The diffusion-model layers of one subject ("subjects") or style ("styles") LoRA, canonical names."""

    def draw(self, kind: str, name: str, generator: torch.Generator) -> object:
        """One training example of that LoRA (its image crop, noise, timestep, caption), from ``generator``."""

    def denoise(self, batch: object) -> torch.Tensor:
        """The model's prediction for a drawn example, through whatever branch the merge's switch says."""

    def attach(self, merge: ZipLoraMerge | None) -> None:
        """Route the model's LoRA layers to this merge's branches (None: to none)."""


def draw_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The generator of one (step, batch slot): every rank, and a resumed run, derives the same draws from it."""
    state = np.random.SeedSequence([seed, step, slot]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def epoch_pairs(seed: int, epoch: int, count: int, slots: int) -> list[int]:
    """Indices of the ``slots`` pairs of one epoch (the effective batch): distinct when there are enough pairs."""
    rng = random.Random(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return rng.sample(range(count), slots) if slots <= count else [rng.randrange(count) for _ in range(slots)]


def rank_pairs(pairs: list, recipe: Recipe, world: World, step: int) -> list[tuple[int, object]]:
    """(global slot, pair) of ``world.rank`` at ``step``: slots rank * batch .. (rank + 1) * batch - 1 of the epoch's
    draw of world size x batch pairs, so N ranks of 1 pair see what one process of N pairs sees."""
    batch, epoch = recipe.batch_pairs, step // recipe.steps_per_pair
    indices = epoch_pairs(recipe.seed, epoch, len(pairs), batch * world.size)
    first = world.rank * batch
    return [(slot, pairs[indices[slot]]) for slot in range(first, first + batch)]


class CoefficientNet(torch.nn.Module):
    """H as one module whose forward gives the coefficients of a list of layer pairs (what DDP wraps)."""

    def __init__(self, hypernet: LoraRarHypernet):
        super().__init__()
        self.hypernet = hypernet

    def forward(self, pairs: list[tuple[LowRankLayer, LowRankLayer]]) -> list[torch.Tensor]:
        """pairs: (subject layer, style layer) each -> (d_in, 2) float32 [m_subject, m_style] with H's graph."""
        factored = FactoredHypernet(self.hypernet, self.hypernet.output[1].weight.device)  # new per call: H changes
        return [factored.coefficients(factored.subject_hidden(subject), style) for subject, style in pairs]


@dataclass
class PairMerge:
    """One pair's ZipLoRA merge with the layers H serves (names, in order) and their factors."""

    subject: str
    style: str
    merge: ZipLoraMerge
    hypernet_layers: list[str]
    factors: list[tuple[LowRankLayer, LowRankLayer]]

    def use(self, coefficients: list[torch.Tensor]) -> None:
        for name, c in zip(self.hypernet_layers, coefficients):
            self.merge.layers[name].use_coefficients(c[:, 0], c[:, 1])

    def mean_abs_cos(self, coefficients: list[torch.Tensor]) -> float:
        """Mean over H's layers of |cos(m_subject, m_style)|."""
        if not coefficients:
            return 0.0
        return float(torch.stack([F.cosine_similarity(c[:, 0], c[:, 1], dim=0).abs() for c in coefficients]).mean())


def _on(layer: LowRankLayer, device: torch.device) -> LowRankLayer:
    return LowRankLayer(layer.up.to(device, torch.float32), layer.down.to(device, torch.float32), layer.scale,
                        layer.kernel, layer.bias)


def pair_merge(task: Task, hypernet: LoraRarHypernet, subject: str, style: str) -> PairMerge:
    subject_layers, style_layers = task.layers("subjects", subject), task.layers("styles", style)
    merge = ZipLoraMerge(subject_layers, style_layers).to(task.device)
    names = [n for n, layer in merge.layers.items() if layer.trainable and attention_role(n) in HYPERNET_ROLES]
    for name, layer in merge.layers.items():
        if layer.trainable:  # summed layers keep m = 1; H's layers get theirs from use_coefficients
            layer.m_subject.requires_grad_(False)
            layer.m_style.requires_grad_(False)
    missing = sorted({subject_layers[n].d_out for n in names} - set(hypernet.widths))
    if missing:
        raise LoraRarError(f"{subject} + {style}: attention width(s) {missing} have no input layer in the hypernet "
                           f"(it serves {sorted(hypernet.widths)}); a fine-tuned network must serve the base model's widths")
    if not names:
        raise LoraRarError(f"{subject} + {style}: the two LoRAs share no to_q / to_out.0 layer: nothing for H to merge")
    factors = [(_on(subject_layers[n], task.device), _on(style_layers[n], task.device)) for n in names]
    return PairMerge(subject, style, merge, names, factors)


@dataclass
class Progress:
    """tqdm when installed, else one plain line per step; rank 0 only."""

    total: int
    start: int
    enabled: bool
    bar: object = None

    def __post_init__(self):
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, terms: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = (f"loss {terms['total']:.5g} (subject {terms['subject']:.4g}, style {terms['style']:.4g}, "
                f"sum|cos| {terms['similarity']:.4g})")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {step}/{self.total}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stop_requests() -> Iterator[list[bool]]:
    """[flag] set on SIGINT / SIGTERM instead of raising: the step in flight finishes, then the loop stops."""
    flag = [False]

    def request(signum, frame):
        flag[0] = True

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request)
    except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
        pass
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    hypernet: LoraRarHypernet
    steps: int  # optimiser steps done in all (with those before a resume)
    stopped: bool  # stopped early by Ctrl-C / SIGTERM (the checkpoint holds the state)
    seconds_per_step: float = float("nan")
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Trains ``hypernet`` on ``train_pairs`` through ``task``; writes into ``run_dir`` (rank 0).

    checkpoint_every / validate_every: in optimiser steps (0: never; a checkpoint is written at the end and on a
    stop anyway). validation_pairs: the held-out (subject, style) pairs, evaluated on fixed draws.
    """

    def __init__(self, hypernet: LoraRarHypernet, task: Task, train_pairs: list[tuple[str, str]],
                 validation_pairs: list[tuple[str, str]], recipe: Recipe, run_dir: Path, world: World = World(), *,
                 checkpoint_every: int = 50, validate_every: int = 50, train_eval_pairs: int = 2,
                 log: Callable[[str], None] | None = None):
        if not train_pairs:
            raise LoraRarError("no training pair (train subjects x train styles is empty)")
        self.hypernet, self.task, self.recipe, self.world = hypernet.to(task.device), task, recipe, world
        self.train_pairs, self.validation_pairs = list(train_pairs), list(validation_pairs)
        self.run_dir, self.checkpoint_every, self.validate_every = Path(run_dir), checkpoint_every, validate_every
        self.train_eval_pairs = self.train_pairs[:train_eval_pairs]
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        hypernet.train().requires_grad_(True)
        self.net = CoefficientNet(hypernet)
        self.model = self.net
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # device_ids None: H already lives on the task's device and its inputs (LoRA factors) are put there, so
            # DDP moves nothing; an input layer no pair of a step uses (one width only) gets a zero gradient, as in
            # one process (train_step fills None gradients with zeros)
            self.model = DistributedDataParallel(self.net, device_ids=None, find_unused_parameters=True)
        self.parameters = list(hypernet.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        fp16 = recipe.mixed_precision == "fp16" and task.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.step = 0
        self._merges: dict[tuple[str, str], PairMerge] = {}

    # ---- pieces ------------------------------------------------------------------------------------------

    def _merge(self, pair: tuple[str, str]) -> PairMerge:
        """The pair's merge; one epoch's pairs are kept (every step of an epoch reuses them)."""
        if pair not in self._merges:
            self._merges[pair] = pair_merge(self.task, self.hypernet, *pair)
        return self._merges[pair]

    def _autocast(self):
        if self.recipe.mixed_precision == "no" or self.task.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.recipe.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    def _denoise(self, batch) -> torch.Tensor:
        with self._autocast():
            return self.task.denoise(batch)

    def _pair_loss(self, merge: PairMerge, coefficients: list[torch.Tensor], generator: torch.Generator):
        merge.use(coefficients)
        self.task.attach(merge.merge)
        subject_batch = self.task.draw("subjects", merge.subject, generator)
        style_batch = self.task.draw("styles", merge.style, generator)
        return ziplora_loss(merge.merge, self._denoise, subject_batch, style_batch, lam=self.recipe.similarity_lambda)

    def local_pairs(self, step: int) -> list[tuple[int, tuple[str, str]]]:
        return rank_pairs(self.train_pairs, self.recipe, self.world, step)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on this rank's pairs; returns the loss terms averaged over the effective batch and the
        pairs of the whole effective batch (all ranks)."""
        pairs = self.local_pairs(self.step)
        if self.step % self.recipe.steps_per_pair == 0:  # a new epoch: the previous pairs are not needed again
            self._merges = {pair: m for pair, m in self._merges.items() if pair in {p for _, p in pairs}}
        totals = torch.zeros(5, dtype=torch.float64)
        for position, (slot, pair) in enumerate(pairs):
            last = position == len(pairs) - 1
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.model.no_sync()
            with sync:
                merge = self._merge(pair)
                loss = self._pair_loss(merge, self.model(merge.factors), draw_generator(self.recipe.seed, self.step, slot))
                # inputs: H's parameters only, whatever else in the graph says requires_grad (base or encoder weights)
                self.scaler.scale(loss.total / len(pairs)).backward(inputs=self.parameters)
            terms = loss.as_floats()
            totals[:4] += torch.tensor([terms[k] for k in ("total", "subject", "style", "similarity")], dtype=torch.float64)
        for parameter in self.parameters:  # a width no pair used: zero, as DDP gives it (AdamW then treats it alike)
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.attach(None)
        totals[4] = float(grad_norm)
        totals[:4] /= len(pairs)
        mean = distributed.mean_over_ranks(self.world, totals)
        self.step += 1
        everyone = [pair for rank in range(self.world.size)  # the effective batch: what every rank drew
                    for _, pair in rank_pairs(self.train_pairs, self.recipe, World(rank, self.world.size), self.step - 1)]
        return {"total": float(mean[0]), "subject": float(mean[1]), "style": float(mean[2]),
                "similarity": float(mean[3]), "grad_norm": float(mean[4]),
                "pairs": [f"{s}+{t}" for s, t in everyone]}

    @torch.no_grad()
    def evaluate(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """The objective's terms and the mean |cos| of H's coefficients on fixed draws of ``pairs`` (averages)."""
        sums = {"total": 0.0, "subject": 0.0, "style": 0.0, "similarity": 0.0, "mean_abs_cos": 0.0}
        for index, pair in enumerate(pairs):
            merge = pair_merge(self.task, self.hypernet, *pair)
            coefficients = self.net(merge.factors)
            loss = self._pair_loss(merge, coefficients, draw_generator(self.recipe.seed, VALIDATION_SEED_STEP, index))
            for key, value in loss.as_floats().items():
                sums[key] += value
            sums["mean_abs_cos"] += merge.mean_abs_cos(coefficients)
        self.task.attach(None)
        return {key: value / max(len(pairs), 1) for key, value in sums.items()}

    # ---- checkpoints and log ------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.step, {k: v.detach().cpu().clone() for k, v in self.hypernet.state_dict().items()},
                          self.optimizer.state_dict(), self.scaler.state_dict(), rng_states(),
                          self.recipe.to_json(self.world.size), self.world.size, [list(p) for p in self.train_pairs])

    def save(self) -> None:
        if self.world.writer:
            save_checkpoint(self.run_dir, self.checkpoint())

    def resume(self) -> None:
        """Continue from the run folder's checkpoint: same recipe (but epochs), same pairs, same effective batch."""
        saved = load_checkpoint(self.run_dir)
        mismatch = resume_mismatch(Recipe.from_json(saved.recipe), self.recipe, saved.world_size, self.world.size)
        if mismatch:
            raise LoraRarError(f"{self.run_dir}: the checkpoint was trained with other settings ({mismatch}); "
                               "resume with the same ones or start a new run")
        if [tuple(p) for p in saved.pairs] != self.train_pairs:
            raise LoraRarError(f"{self.run_dir}: the checkpoint was trained on other pairs than this dataset's train split")
        self.hypernet.load_state_dict(saved.hypernet)
        self.optimizer.load_state_dict(saved.optimizer)
        if saved.scaler:
            self.scaler.load_state_dict(saved.scaler)
        restore_rng_states(saved.rng)
        self.step = saved.step
        if self.world.writer:
            self._trim_log(saved.step)

    def _trim_log(self, step: int) -> None:
        """Drop log lines after the checkpoint's step: the resumed run writes them again."""
        path = self.run_dir / LOG_FILE
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _write_log(self, record: dict) -> None:
        if self.world.writer:
            with open(self.run_dir / LOG_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _validate(self) -> None:
        if not self.world.writer:
            return
        for split, pairs in (("validation", self.validation_pairs), ("train", self.train_eval_pairs)):
            if pairs:
                self._write_log({"kind": "validation", "split": split, "step": self.step, "pairs": len(pairs),
                                 **self.evaluate(pairs)})

    def _refuse_diverged(self) -> None:
        """Stop before a non-finite H is logged or checkpointed: the last checkpoint (finite) stays the one to resume."""
        bad = [name for name, p in self.hypernet.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise LoraRarError(f"step {self.step}: hypernet weights {', '.join(bad[:3])} became NaN or Inf (training "
                               f"diverged); nothing written for this step, the last checkpoint in {self.run_dir} is "
                               "kept: lower --lr or --grad-clip and start over")

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Steps until recipe.total_steps, validating and checkpointing at intervals; a Ctrl-C / SIGTERM finishes
        the step in flight, writes the checkpoint and returns with ``stopped``."""
        total = self.recipe.total_steps
        if self.world.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and self.validate_every:
            self._validate()
        progress, history, started, first = Progress(total, self.step, self.world.writer), [], time.perf_counter(), self.step
        stopped = False
        try:
            with stop_requests() as stop:
                while self.step < total:
                    terms = self.train_step()
                    self._refuse_diverged()
                    record = {"kind": "step", "step": self.step, "epoch": (self.step - 1) // self.recipe.steps_per_pair,
                              "lr": self.optimizer.param_groups[0]["lr"], **terms}
                    history.append(record)
                    self._write_log(record)
                    progress.update(self.step, terms)
                    if self.validate_every and (self.step % self.validate_every == 0 or self.step == total):
                        self._validate()
                    if distributed.any_rank(self.world, stop[0], self.task.device):
                        stopped = True
                        break
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save()
        finally:
            progress.close()
        self.save()
        distributed.barrier(self.world)
        done = self.step - first
        if stopped:
            self.log(f"stopped at step {self.step} of {total}; the checkpoint in {self.run_dir} continues with --resume")
        seconds = (time.perf_counter() - started) / done if done else float("nan")
        return TrainResult(self.hypernet.eval().requires_grad_(False), self.step, stopped, seconds, history)
