"""ZipLoRA (arXiv 2311.13600): per-pair column coefficients optimised through the base model, kept factored.

For every layer both LoRAs patch, two trainable vectors m_subject, m_style of length d_in (init 1, float32
master copies) scale the columns of each update. The merged update is applied to the layer input x as a
parallel branch, never as a dense d_out x d_in matrix:

    y_extra = B_s (A_s (a s_s m_s * x)) + B_t (A_t (b s_t m_t * x))

(a, b: the user's strengths; s_s, s_t: each file's alpha / rank scale; * is the elementwise column scaling).
The objective (ZipLoRA, arXiv 2311.13600, also LoRA.rar's training objective, docs/TRAINING.md):

    MSE(merged(x_c, p_c), subject_only(x_c, p_c)) + MSE(merged(x_s, p_s), style_only(x_s, p_s))
    + lambda * SUM over layers |cos(m_subject, m_style)|

with the same noised latents and timestep for the merged branch and its target, targets under no_grad.
This module is torch only: the model forward is a callable given by the caller (nodes/adapter/
supplies ComfyUI's), the branch each call runs is chosen with :meth:`ZipLoraMerge.branch`; :func:`optimise` runs the
whole optimisation through a host's :class:`~hypernet.calibration.CalibrationRun` (the ZipLoRA node's, and the
registered method ``zip-lora``'s, hypernet/methods/zip_lora.py).
A hypernetwork (hypernet/training/) can produce the coefficients instead: :meth:`ZipLoraLayer.use_coefficients`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .calibration import CalibrationRun
from .coefficients import summarize
from .errors import LoraRarError
from .layers import SIDES, LoraFile, LowRankLayer, kept
from .lowrank import weighted_sum
from .result import MergedLora, Strengths, new_report, source_paths  # the report and paths every merge writes
from .runtime import RuntimeBranch

BRANCHES = ("merged", "subject", "style", "off")  # what the injected layers add to the base output
# ZipLoRA's weight of the summed |cos| term (the paper's 0.01): the one source of the default, which the registered
# method's similarity_lambda parameter (hypernet/methods/zip_lora.py) and the training recipe take
DEFAULT_LAMBDA = 0.01


class _BranchSwitch:
    """The branch every layer of one merge runs now; shared so one switch flips the whole model."""

    def __init__(self):
        self.branch = "merged"


class ZipLoraLayer(torch.nn.Module):
    """One LoRA linear (or 1x1 conv) of the model with its subject and style factors and coefficients.

    subject, style: the layers as read (either may be None: a layer only one LoRA has is applied as it is,
    with no coefficient); strengths fold into the per-column weights. Factors are buffers (frozen), the
    coefficients ``m_subject``/``m_style`` (d_in,) float32 Parameters, present only when both sides exist.
    """

    def __init__(self, subject: LowRankLayer | None, style: LowRankLayer | None, switch: _BranchSwitch,
                 subject_strength: float = 1.0, style_strength: float = 1.0):
        super().__init__()
        self.switch, self.sides = switch, {}
        for side, layer, strength in (("subject", subject, subject_strength), ("style", style, style_strength)):
            if layer is None:
                continue
            self.sides[side] = (layer, float(strength))
            # the scale folds into up (rank columns), so the per-call column weight is strength * m only
            self.register_buffer(f"{side}_up", layer.up.detach().float().flatten(1) * layer.scale, persistent=False)
            self.register_buffer(f"{side}_down", layer.down.detach().float().flatten(1), persistent=False)
            bias = layer.bias.detach().float() * strength if layer.bias is not None else None
            self.register_buffer(f"{side}_bias", bias, persistent=False)
        self.trainable = len(self.sides) == 2
        d_in = (subject or style).d_in
        if self.trainable:
            self.m_subject = torch.nn.Parameter(torch.ones(d_in))
            self.m_style = torch.nn.Parameter(torch.ones(d_in))
        self._given: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cast: dict[tuple, tuple] = {}  # (side, device, dtype) -> (up, down, bias) in the model's compute type

    def _apply(self, fn, *args, **kwargs):
        self._cast.clear()  # moved or converted: the cached copies would be stale
        return super()._apply(fn, *args, **kwargs)

    def _factors(self, side: str, device: torch.device, dtype: torch.dtype) -> tuple:
        """(up, down, bias) of one side on ``device`` in ``dtype``, converted once (fp16/bf16 models on a GPU),
        not on every forward."""
        key = (side, device, dtype)
        if key not in self._cast:
            tensors = (getattr(self, f"{side}_{part}") for part in ("up", "down", "bias"))
            self._cast[key] = tuple(t.to(device, dtype) if t is not None else None for t in tensors)
        return self._cast[key]

    def use_coefficients(self, m_subject: torch.Tensor | None, m_style: torch.Tensor | None = None) -> None:
        """Coefficients (d_in,) from elsewhere (a hypernetwork's output, with its graph) instead of the
        Parameters, until called with None."""
        self._given = None if m_subject is None else (m_subject, m_style)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_subject, m_style), each (d_in,) float32."""
        return self._given if self._given is not None else (self.m_subject, self.m_style)

    def _side(self, side: str, x: torch.Tensor, column_weight: torch.Tensor | None) -> torch.Tensor:
        """B (A (column_weight * x)) [+ bias] for x (..., d_in) -> (..., d_out); computed in x's dtype."""
        _, strength = self.sides[side]
        up, down, bias = self._factors(side, x.device, x.dtype)
        # the fp32 master coefficients are cast into the graph, so their gradient arrives in fp32
        weight = column_weight * strength if column_weight is not None else None
        scaled = x * weight.to(x.device, x.dtype) if weight is not None else x * strength
        out = F.linear(F.linear(scaled, down), up)
        return out + bias if bias is not None else out

    def extra(self, x: torch.Tensor) -> torch.Tensor | None:
        """The branch's addition (..., d_out) to the layer output for input x (..., d_in), channels last for a
        linear and a 1x1 conv alike (the injector moves a conv's channels); None when the current branch adds
        nothing here."""
        branch = self.switch.branch
        sides = [s for s in self.sides if branch == "merged" or branch == s]
        if not sides:
            return None
        coefficients = dict(zip(("subject", "style"), self.coefficients())) if self.trainable and branch == "merged" else {}
        return sum(self._side(side, x, coefficients.get(side)) for side in sides)

    def similarity(self) -> torch.Tensor:
        """|cos(m_subject, m_style)|, a 0-dim tensor (0 for a layer with no coefficients)."""
        if not self.trainable:
            return torch.zeros(())
        m_subject, m_style = self.coefficients()
        return F.cosine_similarity(m_subject, m_style, dim=0).abs()

    def merged_layer(self) -> LowRankLayer:
        """The merged update as one LoRA: up = [B_s | B_t], down = [A_s * a m_s ; A_t * b m_t] (rank r_s + r_t)."""
        m = dict(zip(("subject", "style"), self.coefficients())) if self.trainable else {}
        parts = []
        for side, (layer, strength) in self.sides.items():
            weight = m[side].detach().float().cpu() * strength if side in m else strength
            parts.append((layer, weight, strength))
        return weighted_sum(parts, dtype=torch.float32)


class ZipLoraMerge(torch.nn.Module, RuntimeBranch):
    """Every injected layer of one subject/style pair, keyed by canonical layer name, and the branch switch: the
    runtime branch the host injects (its router: :meth:`branch`, which side the layers add now)."""

    def __init__(self, subject: dict[str, LowRankLayer], style: dict[str, LowRankLayer],
                 subject_strength: float = 1.0, style_strength: float = 1.0):
        super().__init__()
        self.switch = _BranchSwitch()
        names = [n for n in subject if n in style] + [n for n in subject if n not in style] + [n for n in style if n not in subject]
        self.layers = torch.nn.ModuleDict({
            name: ZipLoraLayer(subject.get(name), style.get(name), self.switch, subject_strength, style_strength)
            for name in names})

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def extra(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        return self.layers[name].extra(x)

    def coefficient_parameters(self) -> list[torch.nn.Parameter]:
        """The only trainable tensors: m_subject, m_style of every layer both LoRAs have."""
        return [p for layer in self.layers.values() if layer.trainable for p in (layer.m_subject, layer.m_style)]

    @contextlib.contextmanager
    def branch(self, branch: str) -> Iterator[None]:
        """Run the model with ``branch`` (merged, subject, style or off) inside the block."""
        if branch not in BRANCHES:
            raise ValueError(f"branch {branch!r}: one of {', '.join(BRANCHES)}")
        before, self.switch.branch = self.switch.branch, branch
        try:
            yield
        finally:
            self.switch.branch = before

    def similarity(self) -> torch.Tensor:
        """SUM over layers of |cos(m_subject, m_style)| (a sum, as the published objective)."""
        terms = [layer.similarity() for layer in self.layers.values() if layer.trainable]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def coefficients(self) -> dict[str, torch.Tensor]:
        """layer -> (d_in, 2) float32 CPU [m_subject, m_style], the form MergedLora.coefficients holds."""
        return {name: torch.stack([m.detach().float().cpu() for m in layer.coefficients()], dim=1)
                for name, layer in self.layers.items() if layer.trainable}

    def merged_layers(self) -> dict[str, LowRankLayer]:
        return {name: layer.merged_layer() for name, layer in self.layers.items()}


class RoutedMerge(RuntimeBranch):
    """The branch of whichever :class:`ZipLoraMerge` is attached now (training: the pair of the moment), over a
    fixed set of layers, so the model is patched once for a whole run; no merge attached: nothing is added."""

    def __init__(self, names: list[str]):
        self.names, self.merge = list(names), None

    def layer_names(self) -> list[str]:
        return self.names

    def attach(self, merge: ZipLoraMerge | None) -> None:
        self.merge = merge

    def extra(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        merge = self.merge
        return merge.layers[name].extra(x) if merge is not None and name in merge.layers else None


@dataclass
class ZipLoraLoss:
    """The objective's terms for one step: total = subject + style + lam * similarity (all 0-dim)."""

    total: torch.Tensor
    subject: torch.Tensor
    style: torch.Tensor
    similarity: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "subject", "style", "similarity")}


def ziplora_loss(merge: ZipLoraMerge, denoise: Callable[[object], torch.Tensor], subject_batch, style_batch,
                 lam: float = DEFAULT_LAMBDA) -> ZipLoraLoss:
    """The ZipLoRA objective on one subject batch and one style batch.

    denoise(batch) -> the model's prediction for that batch (noised latents, timestep, conditioning: the
    caller's type); each batch carries its own noise and timestep, so the merged branch and its target see
    the same ones. Targets run under no_grad; only the merged calls build a graph.
    """
    with torch.no_grad():
        with merge.branch("subject"):
            subject_target = denoise(subject_batch)
        with merge.branch("style"):
            style_target = denoise(style_batch)
    with merge.branch("merged"):
        subject_term = F.mse_loss(denoise(subject_batch).float(), subject_target.float())
        style_term = F.mse_loss(denoise(style_batch).float(), style_target.float())
    similarity = merge.similarity()
    return ZipLoraLoss(subject_term + style_term + lam * similarity, subject_term, style_term, similarity)


def optimisation_step(merge: ZipLoraMerge, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], ZipLoraLoss]) -> ZipLoraLoss:
    """One step: gradients of the coefficients only (torch.autograd.grad, so frozen base weights that still
    say requires_grad never get a .grad), then the optimizer's update."""
    loss = loss_fn()
    parameters = merge.coefficient_parameters()
    grads = torch.autograd.grad(loss.total, parameters)
    for parameter, grad in zip(parameters, grads):
        parameter.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@dataclass
class Optimisation:
    """What :func:`optimise` did: the loss terms on one fixed evaluation batch at start and end, each step's, and
    whether the similarity term stopped it early."""

    start: dict[str, float]
    history: list[dict[str, float]]
    end: dict[str, float]
    early_stop: bool


def optimise(merge: ZipLoraMerge, run: CalibrationRun, steps: int, learning_rate: float, similarity_lambda: float,
             stop_similarity: float, seed: int, before_step: Callable[[], None] | None = None,
             after_step: Callable[[int, int, dict[str, float]], None] | None = None) -> Optimisation:
    """The ZipLoRA optimisation of ``merge``'s coefficients through the model ``run`` holds (its branch injected):
    AdamW on the coefficients only, one subject and one style draw per step, every draw from ``seed``; the start and
    end losses on one evaluation batch drawn first, so the two compare. Stops early once the mean |cos| per layer is at
    or below ``stop_similarity``; a non-finite loss or coefficient stops it with a one-line LoraRarError.

    before_step() runs before each step (a host's Cancel), after_step(step, steps, loss) after it (its progress).
    """
    parameters = merge.coefficient_parameters()
    # decoupled weight decay off: it would pull the coefficients toward 0, away from the init 1 both targets favour
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def draw():
        return run.draw("subject", generator), run.draw("style", generator)

    def loss_on(batches):
        return ziplora_loss(merge, run.predict, *batches, lam=similarity_lambda)

    evaluation = draw()
    with torch.no_grad():
        start = _finite(loss_on(evaluation).as_floats(), "at start, before any step,")
    history, early = [], False
    for step in range(steps):
        if before_step is not None:
            before_step()
        batches = draw()
        history.append(_finite(optimisation_step(merge, optimizer, lambda: loss_on(batches)).as_floats(),
                               f"at step {step + 1}"))
        if not all(bool(torch.isfinite(p).all()) for p in parameters):
            raise LoraRarError(f"ZipLoRA: the coefficients became NaN or Inf at step {step + 1} (the optimisation "
                               f"diverged): lower the learning rate ({learning_rate:g}); nothing was applied")
        if after_step is not None:
            after_step(step + 1, steps, history[-1])
        early = float(merge.similarity().detach()) <= stop_similarity * (len(parameters) // 2)
        if early:
            break
    with torch.no_grad():
        end = loss_on(evaluation).as_floats()
    return Optimisation(start, history, end, early)


def _finite(loss: dict[str, float], when: str) -> dict[str, float]:
    """``loss`` when every term is finite; otherwise the run stops here, before a NaN reaches the coefficients, the
    patched model or a saved file."""
    if all(map(math.isfinite, loss.values())):
        return loss
    raise LoraRarError(f"ZipLoRA: the loss {when} is not finite (total {loss['total']:g}, subject {loss['subject']:g}, "
                       f"style {loss['style']:g}): the LoRAs overflow this model's forward (alpha or strength too "
                       "large for its dtype) or the optimisation diverged (lower the learning rate); nothing was applied")


def to_merged_lora(merge: ZipLoraMerge, subject: LoraFile, style: LoraFile, strengths: Strengths | None = None,
                   params: dict[str, float] | None = None) -> MergedLora:
    """The optimised merge as the pack's MergedLora: each layer of rank r_s + r_t (factors as ZipLoraLayer.merged_layer),
    ``coefficients`` layer -> (d_in, 2) for the coefficient picture, so the save node and the picture accept it.

    strengths: the ones the merge was built with (recorded only; they are already folded into the layers).
    """
    report = new_report("ziplora", "sum", subject, style, None)
    report.params = dict(params or {})
    for name, layer in merge.layers.items():
        report.sides[name] = tuple(side for side in SIDES if side in layer.sides)
        if layer.trainable:
            report.actions[name] = "ziplora"
        else:
            side = next(iter(layer.sides))
            report.actions[name], report.reasons[name] = kept(side), f"only the {side} LoRA has this layer"
    coefficients = merge.coefficients()
    report.coefficient_means = [tuple(c.mean(0).tolist()) for c in coefficients.values()]
    report.coefficient_blocks = summarize(coefficients)
    return MergedLora(layers=merge.merged_layers(), report=report, sources={"subject": subject.sha256, "style": style.sha256},
                      strengths=strengths or Strengths(), source_paths=source_paths(subject, style, None),
                      coefficients=coefficients)
