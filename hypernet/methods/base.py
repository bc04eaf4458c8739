"""What a merge method is: one rule that merges a layer's subject and style factors into one low-rank layer.

A method is one module holding one :class:`MergeMethod` subclass, registered in ``hypernet.methods``. The
pipeline (hypernet/pipeline.py) asks :meth:`MergeMethod.claim` about every layer while planning, then calls
:meth:`MergeMethod.merge` (or :meth:`MergeMethod.merge_batch`) for the layers the method claimed; every other
layer follows the layer policy. No method knows about files, reports or ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration import Calibration
from ..layers import SIDES, kept  # noqa: F401  (public here too)
from ..names import attention_role
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..layers import LowRankLayer
    from ..runtime import RuntimePart


@dataclass(frozen=True)
class Param:
    """A number a method takes (e.g. NP-LoRA's mu); the node shows it as ``<method>_<name>``, the CLI as
    ``--<method>-<name>``, both with ``help`` as tooltip."""

    name: str
    default: float
    minimum: float
    maximum: float
    help: str
    step: float = 0.01


@dataclass(frozen=True)
class Claim:
    """The method merges this layer: ``action`` is what the report counts ("hypernet", "summed", ...),
    ``reason`` the one line it gives (empty: the method's own rule needs none), ``sides`` the LoRAs the merged
    layer comes from (both, or the one side of a layer kept as it is: :meth:`keep`)."""

    action: str
    reason: str = ""
    sides: tuple[str, ...] = SIDES

    @classmethod
    def keep(cls, side: str, reason: str = "") -> "Claim":
        """The layer of LoRA ``side`` ("subject" or "style") alone, its strength applied."""
        return cls(kept(side), reason, (side,))


@dataclass
class LayerJob:
    """One layer to merge: the two sides' factors (one may be None for methods that keep single layers),
    the strengths that scale them, and the merged factors' dtype."""

    name: str
    subject: LowRankLayer | None
    style: LowRankLayer | None
    subject_weight: float
    style_weight: float
    dtype: torch.dtype
    action: str = ""
    sides: tuple[str, ...] = SIDES  # the LoRAs the merged layer comes from (the claim's)
    calibrated: object | None = None  # what a data-driven method's calibrate() learned for this layer


@dataclass
class MergedLayer:
    """One merged layer: ``layer`` patched once (static), and/or ``runtime``: the method's own per-layer data for
    its runtime branch (K-LoRA: both sides and their scores), which :meth:`MergeMethod.finish` gathers."""

    layer: LowRankLayer | None
    coefficients: torch.Tensor | None = None  # (d_in, 2) subject/style column coefficients, when the rule has them
    runtime: object | None = None


@dataclass
class MergeContext:
    """What a merge call shares with its method: the hypernet (if any), the device the math runs on, the
    method's parameters, whether same-shape layers go through the method together, and a per-layer scratch
    the pipeline empties before each new layer (e.g. the subject's share of H, reused across styles)."""

    hypernet: object | None
    device: torch.device
    layout: object | None = None  # the UNetLayout the LoRAs fit (None: not known, or a model that is no UNet)
    params: dict[str, float] = field(default_factory=dict)
    batched: bool = False
    memo: dict = field(default_factory=dict)  # emptied before each layer
    state: dict = field(default_factory=dict)  # kept for the whole call (e.g. H converted to float32 once)
    family: str | None = None  # the model family the LoRAs are for, as ComfyUI names it ("Flux", "SDXL"), if known
    # canonical layer name -> attention role (hypernet.keys.ATTENTION_ROLES), read from the loaded model's own
    # modules; None when no model is at hand (the CLI): then the UNet layout's names say it (keys.attention_role)
    roles: dict[str, str] | None = None
    # the model and data a data-driven method runs through (hypernet.calibration.Calibration), from the host (the
    # merge and compare nodes: each LoRA's conditioning; the ZipLoRA node: reference images); None: only the LoRA
    # files are at hand (the CLI)
    calibration: Calibration | None = None

    def role(self, name: str) -> str | None:
        """The attention role of a layer: 'to_q', 'to_k', 'to_v', 'to_out', 'qkv', 'qkv+mlp', 'out+mlp' or None."""
        return self.roles.get(name) if self.roles is not None else attention_role(name)


class MergeMethod:
    """Base class: subclasses set ``name``/``help``, ``since``/``position`` (and ``params``, ``needs_hypernet``) and
    implement :meth:`claim` and :meth:`merge`."""

    name: str = ""
    help: str = ""
    # Where it is listed (node, CLI, compare columns) and where its parameter widgets go: after every method of an
    # earlier pack version, then by position. Saved workflows hold widget values by position, so a new method
    # declares the version that adds it and the next free position there: its widgets come after every existing one.
    since: str = ""  # the pack version that added the method, e.g. "0.2.0"
    position: int = 0  # its place among the methods that version added: 1, 2, ...
    params: tuple[Param, ...] = ()
    needs_hypernet: bool = False
    sampling_time: bool = False  # the result is chosen per sampling step (K-LoRA): no single LoRA file holds it
    # why no LoRA file holds a merge with a runtime part, after the method's name: the one wording the save node,
    # MergedLora's writers and the CLI refuse it with (K-LoRA: "chooses per step at sampling time")
    unsavable: str = "is chosen while the model samples"
    needs_roles: bool = False  # the rule is for attention projections: a merge where it covers no layer is refused
    # data-driven: the method runs the model before it merges (:meth:`calibrate`, through ``ctx.calibration``); a merge
    # without a calibration is refused. needs_references: on each side's reference images and prompts (ZipLoRA), which
    # only a node taking them can give; without: on the model and prompts alone (a calibration pass, SSR-Merge)
    needs_model: bool = False
    needs_references: bool = False
    # the rule takes every layer either LoRA has, alone or paired (direct: the sum), so the layer policy never decides;
    # a layer whose other side is an adapter no rule merges (DoRA, LoHa, ...) then keeps its plain side
    claims_every_layer: bool = False
    # the rule is per layer and needs neither a hypernet nor the base model's layout: the CLI can merge LoRAs of any
    # model family with it, pairing layers by the names written in the files (--base any, hypernet/any_family.py)
    layout_free: bool = False

    def unsupported(self, ctx: MergeContext) -> str | None:
        """Why this method cannot merge LoRAs for ``ctx``'s model family (a one-line reason), or None."""
        return None

    def claim(self, name: str, subject: LowRankLayer | None, style: LowRankLayer | None,
              ctx: MergeContext) -> Claim | str | None:
        """Claim the layer, or decline: a string says why (the report shows it), None leaves the pipeline's
        generic reason (only in one LoRA, text encoder, not an attention projection)."""
        raise NotImplementedError

    def calibrate(self, jobs: list[LayerJob], ctx: MergeContext) -> None:
        """A data-driven method's run through the model (``ctx.calibration``), once per (subject, style) pair after
        planning and before any :meth:`merge`: ``jobs`` are the pair's claimed layers, and what the run learns for
        each goes into its ``job.calibrated`` for :meth:`merge`. Called only when ``needs_model``."""

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        raise NotImplementedError

    def finish(self, runtime: dict[str, object], params: dict[str, float]) -> "RuntimePart | None":
        """The runtime part (hypernet.runtime.RuntimePart) of one merged LoRA, from every layer's ``runtime`` data
        (a rule that compares layers, like K-LoRA's gamma, needs them all); None for a plain LoRA."""
        return None

    def merge_batch(self, jobs: list[LayerJob], ctx: MergeContext) -> list[MergedLayer]:
        """Many claimed layers at once (used when ``ctx.batched``); the default merges them one by one."""
        return [self.merge(job, ctx) for job in jobs]
