"""Coefficient picture node: where a merged LoRA kept the subject and where the style, as an IMAGE and a summary."""

from __future__ import annotations

from .adapter import CATEGORY, MERGED_TYPE, coefficient_outputs


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
        return coefficient_outputs(merged_lora)
