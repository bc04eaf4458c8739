"""np-lora: the subject update projected away from the style LoRA's input-side principal directions
(NP-LoRA, arXiv 2511.11051), for every layer present in both LoRAs.

dW = b * dW_style + a * dW_subject (I - c V V^T), c = mu / (1 + mu), where V holds the style update's top-k right
singular vectors, k = the style LoRA's rank (a, b: strengths). Exactly from the factors: the style's row space
lies in span(down_style^T): with Q from a thin QR of down_style^T (d_in x r_style) and the SVD of the small core
up_style R^T, V = Q W (W: the core's right singular vectors with non-zero singular values; V V^T = Q Q^T when the
style has full rank), and the merged layer is up = [up_subject | up_style], down = [down_subject - c (down_subject V)
V^T ; down_style]: rank r_subject + r_style, never a dense update. Projecting the style instead would erase it.
"""

from __future__ import annotations

import torch

from ..layers import LowRankLayer
from ..lowrank import weighted_sum
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param


def style_directions(style: LowRankLayer) -> torch.Tensor:
    """An orthonormal basis (d_in, k) of the style update's row space, k its true rank (<= r_style).

    span(down^T) holds it, but is larger when up loses rank (e.g. columns never trained away from zero), and then
    the subject would also be projected off directions the style does not use. So: down^T = Q R, the update is
    (up R^T) Q^T, and the right singular vectors of the small (d_out, r) core with non-zero singular values,
    mapped through Q, are the style's principal input directions.
    """
    q, r = torch.linalg.qr(style.down.double().T)  # (d_in, r), (r, r)
    _, singular, wh = torch.linalg.svd(style.up.double() @ r.T, full_matrices=False)
    kept = singular > singular[:1].clamp_min(torch.finfo(torch.float64).tiny) * 1e-10
    return q @ wh[kept].T


def project_away(subject: LowRankLayer, style: LowRankLayer, strength: float) -> LowRankLayer:
    """The subject layer with ``strength`` (= c) of its input side projected onto the style's row space removed."""
    v = style_directions(style)  # (d_in, k)
    down = subject.down.double()
    down = down - strength * (down @ v) @ v.T  # (r_subject, d_in): only r x k and k x d_in products
    return LowRankLayer(up=subject.up, down=down.float(), scale=subject.scale, kernel=subject.kernel, bias=subject.bias)


class NpLoraMethod(MergeMethod):
    name = "np-lora"
    since, position = "0.2.0", 1
    help = ("NP-LoRA: the subject's update projected away from the style's principal input directions, "
            "then added to the style (training-free, closed form)")
    params = (Param("mu", 0.5, 0.0, 100.0, "projection strength: c = mu / (1 + mu) of the subject's overlap with "
                    "the style's input directions is removed (0: plain sum; the paper's default 0.5)"),)
    layout_free = True

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | None:
        if subject is None or style is None:
            return None
        return Claim("projected", "subject projected away from the style's input directions")

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        mu = ctx.params["mu"]
        subject = project_away(job.subject, job.style, mu / (1.0 + mu))
        return MergedLayer(weighted_sum([(subject, job.subject_weight), (job.style, job.style_weight)], ctx.device,
                                        job.dtype))


register(NpLoraMethod())
