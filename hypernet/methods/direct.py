"""direct: dW = a * dW_subject + b * dW_style, what two stacked LoRA loaders apply (PEFT's "cat")."""

from __future__ import annotations

from ..lowrank import weighted_sum
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod


class DirectMerge(MergeMethod):
    name = "direct"
    since, position = "0.1.0", 2
    help = "plain strength-weighted sum of both LoRAs (what two stacked LoRA loaders do), for comparison"
    claims_every_layer = True
    layout_free = True

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim:
        present = [side for side, layer in (("subject", subject), ("style", style)) if layer is not None]
        return Claim("summed", "direct method") if len(present) == 2 else Claim.keep(present[0], "direct method")

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        parts = [(layer, weight) for layer, weight in ((job.subject, job.subject_weight), (job.style, job.style_weight))
                 if layer is not None]
        return MergedLayer(weighted_sum(parts, ctx.device, job.dtype))


register(DirectMerge())
