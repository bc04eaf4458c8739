"""ssr-merge: SSR-Merge (arXiv 2606.10617, ICML 2026), a data-driven merge from one calibration step per LoRA.

Per layer both LoRAs touch, with A = [A_subject; A_style] (R x d_in, R = r_subject + r_style) and B = [B_subject
B_style] (scale folded into B): each LoRA alone, at strength 1, runs one sampling step of the base model with its
own conditioning; for every token x reaching the layer, z = A x gives G += z z^T (tokens of both runs) and, in the
rows of LoRA k, Q += z_k z^T (tokens of LoRA k's own run only). With N the number of tokens, G <- G / N + lambda I,
Q <- Q / N, the router R = Q G^-1 (float64, solved, never inverted) and the merged layer is the LoRA B' = B R,
A' = A of rank R: patched and saved like any static merge, never a dense d_out x d_in update. Tokens that excite only
their own LoRA (A_j x = 0 for x of LoRA k, j != k) give Q = G - lambda I, so R -> I as lambda -> 0: the direct sum.

The strengths scale after the router: LoRA k's rows of A' are multiplied by its strength (1: the published rule).
The statistics are R x R per layer, reduced on the fly in the layer's forward (no token is kept). The run through
the model is the host's (``MergeContext.calibration``, hypernet/calibration.py: ComfyUI's own model and sampling,
nodes/adapter/calibration.py); the statistics depend on neither strengths nor lambda, so the host keeps them.
Layers only one LoRA has are in the model during its run and kept as they are; a layer no token reached gets R = I;
text-encoder layers are not in the diffusion model's forward and follow the layer policy, as k x k convs do (the
runtime branch adds nothing to a k x k conv).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraRarError
from ..keys import is_text_encoder
from ..layers import SIDES, LowRankLayer
from ..lowrank import weighted_sum
from ..runtime import FactorCache, RuntimeBranch
from . import register
from .base import Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param

RIDGE = Param("ridge", 1e-4, 0.0, 1.0, "lambda: the ridge added to G / N before the router R = Q G^-1 is solved "
              "(SSR-Merge: 1e-4); it keeps a LoRA no token excites (all zeros) from making G singular.", step=0.00001)
CALIBRATION_PX = Param("calibration_px", 1024.0, 16.0, 4096.0, "Image size of the calibration step (one sampling "
                       "step per LoRA from an empty latent of this many pixels a side; SSR-Merge: 1024).", step=16.0)


class RouterStatistics:
    """G and Q of one layer (R x R, float64), summed over the tokens of the calibration steps; no token is kept."""

    def __init__(self, ranks: tuple[int, int]):
        total = sum(ranks)
        self.rows = (slice(0, ranks[0]), slice(ranks[0], total))
        self.gram = torch.zeros(total, total, dtype=torch.float64)
        self.cross = torch.zeros(total, total, dtype=torch.float64)
        self.tokens = 0

    def add(self, z: torch.Tensor, side: int) -> None:
        """Tokens z = A x, (T, R), seen while LoRA ``side`` (0 subject, 1 style) ran alone."""
        exact = z.double() if z.device.type in ("cpu", "cuda") else z.float()  # MPS has no float64
        product = (exact.T @ exact).to("cpu", torch.float64)
        self.gram += product
        self.cross[self.rows[side]] += product[self.rows[side]]
        self.tokens += z.shape[0]

    def router(self, ridge: float) -> torch.Tensor:
        """R = (Q / N) (G / N + ridge I)^-1, (R, R) float64; the identity when no token reached the layer."""
        total = self.gram.shape[0]
        if self.tokens == 0:
            return torch.eye(total, dtype=torch.float64)
        gram = self.gram / self.tokens + ridge * torch.eye(total, dtype=torch.float64)
        return torch.linalg.solve(gram, self.cross / self.tokens, left=False)  # X G = Q


def routed_layer(subject: LowRankLayer, style: LowRankLayer, router: torch.Tensor, weights: tuple[float, float],
                 dtype: torch.dtype) -> LowRankLayer:
    """B' = [B_subject B_style] R, A' = [w_s A_subject; w_t A_style] (scales folded into B), bias differences summed
    with the strengths; factors in ``dtype`` on the CPU (float32 where float16 would overflow)."""
    up = torch.cat([layer.up.flatten(1).double() * layer.scale for layer in (subject, style)], dim=1) @ router
    down = torch.cat([layer.down.flatten(1).double() * weight for layer, weight in zip((subject, style), weights)])
    if dtype == torch.float16 and not (up.abs().max() < 65504 and down.abs().max() < 65504):
        dtype = torch.float32
    biases = [layer.bias.double() * weight for layer, weight in zip((subject, style), weights) if layer.bias is not None]
    return LowRankLayer(up=up.to(dtype), down=down.to(dtype), scale=1.0, kernel=subject.kernel or style.kernel,
                        bias=sum(biases).to(dtype) if biases else None)


class CalibrationBranch(RuntimeBranch):
    """The runtime branch of the calibration steps: LoRA ``side`` alone at strength 1 in every layer it has, and
    the statistics of every layer both have, reduced from the layer's input as the forward passes."""

    def __init__(self, jobs: list[LayerJob]):
        self.layers = {job.name: (job.subject, job.style) for job in jobs}
        self.statistics = {job.name: RouterStatistics((job.subject.rank, job.style.rank))
                           for job in jobs if job.subject is not None and job.style is not None}
        self.side = 0  # the LoRA running now: 0 subject, 1 style
        self._factors = FactorCache()

    def layer_names(self):
        return self.layers.keys()

    def misfit(self, name, weight_shape, bias_shape):
        return next(filter(None, (layer.misfit(weight_shape, bias_shape) for layer in self.layers[name] if layer)), None)

    def extra(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        layers, side = self.layers[name], self.side
        if layers[side] is None:
            return None
        flat = x.reshape(-1, x.shape[-1]).float()
        factors = [None if layer is None else self._factors.get((name, k), layer, x.device, torch.float32)
                   for k, layer in enumerate(layers)]
        z = [None if f is None else torch.nn.functional.linear(flat, f[0]) for f in factors]
        statistics = self.statistics.get(name)
        if statistics is not None:
            tokens = torch.cat(z, dim=1)
            if not bool(torch.isfinite(tokens).all()):
                raise LoraRarError(f"ssr-merge: the {SIDES[side]} LoRA's calibration step gave activations that are "
                                   f"not finite at layer {name} (a LoRA or model weight out of range): nothing merged")
            statistics.add(tokens, side)
        _, up, bias = factors[side]
        out = torch.nn.functional.linear(z[side], up, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class SsrMerge(MergeMethod):
    name = "ssr-merge"
    since, position = "0.2.0", 7
    help = ("SSR-Merge: one calibration step per LoRA (its own conditioning) through the model; per layer a router "
            "R = Q G^-1 from what the layer saw, merged LoRA B R, A (rank r_s + r_t): a static LoRA, saved like any")
    params = (RIDGE, CALIBRATION_PX)
    needs_model = True

    def unsupported(self, ctx: MergeContext) -> str | None:
        if ctx.calibration is None or not ctx.calibration.references:
            return None
        return "calibrates on each LoRA's own conditioning, not on reference images: use the merge node"

    def claim(self, name, subject, style, ctx: MergeContext) -> Claim | str | None:
        if is_text_encoder(name):
            return None
        layer = subject if subject is not None else style
        if math.prod(layer.kernel) > 1:
            return "a k x k conv: the calibration step cannot read its input as tokens"
        if subject is None or style is None:  # in the model during its own LoRA's step, as the file gives it
            side = "subject" if style is None else "style"
            return Claim.keep(side, f"only the {side} LoRA has this layer")
        return Claim("routed")

    def calibrate(self, jobs: list[LayerJob], ctx: MergeContext) -> None:
        calibration = ctx.calibration
        what = (self.name, int(ctx.params["calibration_px"]), tuple(sorted(job.name for job in jobs)))
        statistics = calibration.reuse(what, lambda: self._statistics(jobs, ctx))
        for job in jobs:
            if job.name in statistics:
                try:
                    job.calibrated = statistics[job.name].router(ctx.params["ridge"])
                except torch.linalg.LinAlgError:  # ridge 0 and a rank-deficient G: the rule has no router here
                    files = getattr(calibration, "files", "the LoRAs")
                    raise LoraRarError(f"ssr-merge: layer {job.name} of {files}: G is singular with ridge "
                                       f"{ctx.params['ridge']:g} (a LoRA no token excites, e.g. all zeros, or the "
                                       "same LoRA as subject and style): set ssr_merge_ridge above 0") from None

    @staticmethod
    def _statistics(jobs: list[LayerJob], ctx: MergeContext) -> dict[str, RouterStatistics]:
        branch = CalibrationBranch(jobs)
        if not branch.statistics:
            return {}
        with ctx.calibration.running(branch) as run:
            for index, side in enumerate(SIDES):
                branch.side = index
                generator = torch.Generator().manual_seed(ctx.calibration.seed)  # the same noise for both LoRAs
                run.predict(run.draw(side, generator, int(ctx.params["calibration_px"])))
        return branch.statistics

    def merge(self, job: LayerJob, ctx: MergeContext) -> MergedLayer:
        if job.subject is None or job.style is None:  # one LoRA's layer, as its file gives it
            parts = [(layer, weight) for layer, weight in ((job.subject, job.subject_weight), (job.style, job.style_weight))
                     if layer is not None]
            return MergedLayer(weighted_sum(parts, ctx.device, job.dtype))
        return MergedLayer(routed_layer(job.subject, job.style, job.calibrated, (job.subject_weight, job.style_weight),
                                        job.dtype))


register(SsrMerge())
