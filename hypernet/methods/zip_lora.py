"""zip-lora: ZipLoRA (arXiv 2311.13600), a data-driven merge: for every diffusion-model layer both LoRAs patch, two
column coefficient vectors m_subject, m_style optimised through the base model on reference images and prompts of
each side, then merged as [up_s | up_t], [down_s * a m_s ; down_t * b m_t] (rank r_s + r_t, never dense).

The objective, the factored branch and the optimisation loop are ``hypernet/ziplora.py``; this module is ZipLoRA as
a registered method: its parameters (the single source of the defaults the ZipLoRA node shows), and the run through
the model a merge hands it (``MergeContext.calibration``, hypernet/calibration.py). It needs each side's reference
images and prompts, which only the LoRA.rar ZipLoRA node takes: the merge node, the compare node and the CLI have
none and refuse it in one line. Text-encoder layers are not part of the optimisation: they follow the layer policy.
"""

from __future__ import annotations

import torch

from ..keys import is_text_encoder
from ..ziplora import DEFAULT_LAMBDA, ZipLoraMerge, optimise
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param

STEPS = Param("steps", 100.0, 1.0, 10000.0, "Optimisation steps (ZipLoRA: at most 100).", step=1.0)
LEARNING_RATE = Param(  # LoRA.rar's ZipLoRA baseline; the paper gives none
    "learning_rate", 0.01, 1e-6, 1.0, "AdamW's learning rate on the coefficients. 0.01 as LoRA.rar's ZipLoRA baseline "
    "(the paper gives none; the diffusers script's 1e-4 barely moves coefficients that start at 1 in 100 steps).",
    step=0.0001)
SIMILARITY_LAMBDA = Param(  # ZipLoRA's and LoRA.rar's weight of the summed |cos| term
    "similarity_lambda", DEFAULT_LAMBDA, 0.0, 100.0, "lambda: weight of sum |cos(m_subject, m_style)| over the layers "
    "(ZipLoRA: 0.01).", step=0.001)
# Early stop: the published rule is "until the cosine reaches 0", but |cos| of two float32 vectors only reaches
# exactly 0 by chance, so the default stops once the mean |cos| per layer is below 1e-3 (the columns' weight
# vectors within 0.06 degrees of orthogonal): further steps can no longer lower lambda * sum|cos| measurably.
STOP_SIMILARITY = Param(
    "stop_similarity", 1e-3, 0.0, 1.0, "Early stop once the mean |cos| per layer is at or below this (ZipLoRA stops "
    "when the cosine reaches 0; float cosines hit exactly 0 only by chance). 0: run every step.", step=0.0001)


class ZipLoraMethod(MergeMethod):
    name = "zip-lora"
    since, position = "0.2.0", 5
    help = ("ZipLoRA: per-column subject and style coefficients optimised through the model on reference images and "
            "prompts of each (the LoRA.rar ZipLoRA node); minutes per pair")
    # steps is a count, exact as a float; the seed (64 bits, a node widget with control_after_generate) belongs to
    # the calibration's draws, not to the method
    params = (STEPS, LEARNING_RATE, SIMILARITY_LAMBDA, STOP_SIMILARITY)
    needs_model = True
    needs_references = True

    def unsupported(self, ctx: MergeContext) -> str | None:
        if ctx.calibration is not None and ctx.calibration.references:
            return None
        return ("needs reference images and prompts of the subject and the style to optimise through the model: use "
                "the LoRA.rar ZipLoRA node, which takes them")

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | None:
        if is_text_encoder(name):
            return None
        if subject is None or style is None:  # in the model during the optimisation, as the files give it
            side = "subject" if style is None else "style"
            return Claim.keep(side, f"only the {side} LoRA has this layer")
        return Claim("ziplora")

    def calibrate(self, jobs: list[LayerJob], ctx: MergeContext) -> None:
        if not any(job.action == "ziplora" for job in jobs):
            return
        merge = ZipLoraMerge({job.name: job.subject for job in jobs if job.subject is not None},
                             {job.name: job.style for job in jobs if job.style is not None},
                             jobs[0].subject_weight, jobs[0].style_weight)  # diffusion-model layers: one strength
        params = ctx.params
        with torch.enable_grad(), ctx.calibration.running(merge) as run:
            optimise(merge, run, int(params["steps"]), params["learning_rate"], params["similarity_lambda"],
                     params["stop_similarity"], ctx.calibration.seed)
        for job in jobs:
            job.calibrated = merge.layers[job.name]

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        """The optimised layer as one LoRA (float32, as the ZipLoRA node gives it), with its (d_in, 2) coefficients."""
        layer = job.calibrated  # hypernet.ziplora.ZipLoraLayer
        coefficients = torch.stack([m.detach().float() for m in layer.coefficients()], dim=1) if layer.trainable else None
        return MergedLayer(layer.merged_layer(), coefficients)


register(ZipLoraMethod())
