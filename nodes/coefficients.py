"""Coefficient picture node: where a merged LoRA kept the subject and where the style, as an IMAGE and a summary."""

from __future__ import annotations

import numpy
import torch

from ..hypernet.coefficients import coefficient_picture, overall, summarize, summary_lines
from ..hypernet.errors import LoraRarError
from .common import CATEGORY, MERGED_TYPE


def _no_coefficients(merged) -> str:
    method = merged.report.method
    if method == "lorarar":
        return (f"{merged.report.subject} + {merged.report.style}: made with lorarar, but no layer went through the "
                "hypernet (see the merge report), so there are no per-column coefficients to draw")
    return (f"made with {method}: it has no per-column coefficients; the picture needs lorarar (or zip-lora)")


class LoraRarCoefficientPicture:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "summary")
    OUTPUT_TOOLTIPS = (
        "Per layer, grouped by UNet block and projection: the distribution of the subject and the style "
        "coefficients over the layer's input columns.",
        "Per block: mean subject and style coefficient and the share of columns where the style dominates.",
    )
    FUNCTION = "draw"
    DESCRIPTION = (
        "Shows where a LoRA.rar merge kept the subject and where the style: the hypernet predicts, for every "
        "input column of each merged attention layer, a subject and a style coefficient. The picture shows "
        "their spread per layer, grouped by UNet block (input_blocks.N, middle_block, output_blocks.N) and "
        "projection (to_q, to_out), with each block's share of columns where |style| > |subject|."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "merged_lora": (MERGED_TYPE, {"tooltip": "From the LoRA.rar Merge node, made with method lorarar."}),
        }}

    def draw(self, merged_lora):
        if not merged_lora.coefficients:
            raise LoraRarError(_no_coefficients(merged_lora))
        report = merged_lora.report
        picture = coefficient_picture(merged_lora.coefficients, f"{report.method}: {report.subject} + {report.style}")
        image = torch.from_numpy(numpy.asarray(picture, dtype=numpy.float32) / 255.0)[None]  # (1, H, W, 3) in [0, 1]
        everything = overall(merged_lora.coefficients)
        summary = "\n".join([
            f"{report.method}: {report.subject} + {report.style}",
            f"all {everything.layers} layers: subject mean {everything.subject_mean:.3f}, style mean "
            f"{everything.style_mean:.3f}, style dominates {everything.style_dominant:.1%} of columns",
            *summary_lines(summarize(merged_lora.coefficients))])
        return (image, summary)
