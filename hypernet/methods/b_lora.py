"""b-lora: the block split of B-LoRA (arXiv 2403.14572): the subject LoRA's content block and the style LoRA's
style block; every other layer follows the layer policy.

SDXL: content in up_blocks.0.attentions.0 (SGM output_blocks.0.1), style in up_blocks.0.attentions.1
(output_blocks.1.1). Only layouts whose split was published are listed; others get a clear error.
"""

from __future__ import annotations

import dataclasses

from ..base_models import SDXL, UNetLayout
from ..errors import LoraRarError
from ..lowrank import weighted_sum
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod

# (layout, content block, style block), SGM names as kohya layer names spell them
SPLITS = ((SDXL, "lora_unet_output_blocks_0_1_", "lora_unet_output_blocks_1_1_"),)


def split_for(layout: UNetLayout | None, family: str | None = None) -> tuple[str, str]:
    """(content block prefix, style block prefix) of ``layout``, compared by structure, not by name."""
    if layout is not None:
        for known, content, style in SPLITS:
            if dataclasses.replace(layout, name=known.name) == known:
                return content, style
    named = layout.name if layout is not None else (f"{family} models" if family else "an unknown base model")
    raise LoraRarError(f"b-lora: no published content/style block split for {named} (B-LoRA's is published for "
                       f"{', '.join(known.name.upper() for known, _, _ in SPLITS)} only); use another method")


class BLoraMethod(MergeMethod):
    name = "b-lora"
    since, position = "0.2.0", 2
    help = "B-LoRA block split: the subject's content block and the style's style block (SDXL); the rest by layer policy"

    def unsupported(self, ctx: MergeContext) -> str | None:
        try:
            split_for(ctx.layout, ctx.family)
        except LoraRarError as error:
            return str(error).removeprefix("b-lora: ")
        return None

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | str:
        content, style_block = split_for(ctx.layout)
        if name.startswith(content):
            return Claim.keep("subject", "B-LoRA content block") if subject is not None else \
                "B-LoRA content block, but the subject LoRA has no such layer"
        if name.startswith(style_block):
            return Claim.keep("style", "B-LoRA style block") if style is not None else \
                "B-LoRA style block, but the style LoRA has no such layer"
        return "outside B-LoRA's content and style blocks"

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        side = (job.subject, job.subject_weight) if job.sides == ("subject",) else (job.style, job.style_weight)
        return MergedLayer(weighted_sum([side], ctx.device, job.dtype))


register(BLoraMethod())
