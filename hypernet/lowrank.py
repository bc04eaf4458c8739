"""Sums of low-rank updates kept low-rank: the one arithmetic every merge rule ends in."""

from __future__ import annotations

import torch

from .layers import LowRankLayer


def weighted_sum(parts: list[tuple], device=None, dtype: torch.dtype = torch.float32) -> LowRankLayer:
    """sum_i weight_i * dW_i as one low-rank layer: up = [up_1 | up_2 | ...], down = [down_1 * w_1 ; ...].

    parts: (layer, weight) or (layer, weight, strength), weight a scalar or a per-column (d_in,) vector;
    bias differences are summed with the scalar strength (the weight itself when it is a scalar). Weights are
    applied in float32 and the factors stored in ``dtype`` on the CPU, each output factor written once; a
    float16 factor that would overflow (LoRA.rar's coefficients are unbounded) is kept in float32 instead.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    down = torch.empty(sum(part[0].rank for part in parts), parts[0][0].d_in, dtype=dtype, device=device)
    row = 0
    for layer, weight, *_ in parts:
        if isinstance(weight, torch.Tensor):
            column_weight = weight.to(device, torch.float32) * layer.scale
        else:
            # one element but not 0-dim, so type promotion computes in float32 for bf16/fp16 factors too
            column_weight = torch.full((1,), float(weight) * layer.scale, dtype=torch.float32, device=device)
        # float32 product (the weight is float32), rounded once into the output dtype
        torch.mul(layer.down.to(device), column_weight, out=down[row:row + layer.rank])
        row += layer.rank
    if dtype == torch.float16 and not torch.isfinite(down).all():
        return weighted_sum(parts, device, torch.float32)
    up = torch.cat([part[0].up.to(dtype) for part in parts], dim=1)
    biases = [(part[0].bias, part[2] if len(part) > 2 else part[1]) for part in parts if part[0].bias is not None]
    bias = sum(b.to(torch.float32) * float(w) for b, w in biases).to(dtype) if biases else None
    kernel = next((part[0].kernel for part in parts if part[0].kernel), ())
    return LowRankLayer(up=up, down=down.to("cpu"), scale=1.0, kernel=kernel, bias=bias)


def update_bound(layer: LowRankLayer) -> float:
    """An upper bound on |scale * up @ down| from two passes over the factors (NaN when a factor holds NaN).

    |dW_ij| <= rank * max|up| * max|down| * |scale|; computed in Python floats (float64), so it does not
    itself overflow where float32 would.
    """
    def largest(tensor: torch.Tensor) -> float:
        low, high = torch.aminmax(tensor)  # one pass, no temporary; NaN propagates
        return max(-float(low), float(high))
    return layer.rank * largest(layer.up) * largest(layer.down) * abs(layer.scale)


def patched_overflow(layer: LowRankLayer, weight: torch.Tensor, dtype: torch.dtype, columns: int = 256) -> float | None:
    """The largest |weight + dW| when ``dtype`` cannot hold it (ComfyUI would patch Inf), else None.

    weight: the model weight the layer patches (any shape with d_out * d_in elements). The bound decides
    first; only a layer whose bound exceeds the limit is formed, ``columns`` input columns at a time, so the
    whole d_out x d_in update never exists.
    """
    limit = torch.finfo(dtype).max
    weight = weight.detach().reshape(layer.d_out, layer.d_in)
    # float8 weights (a model loaded with weight_dtype fp8) have no abs/max kernels: read them as float32 in blocks
    widest = max((float(weight[:, start:start + columns].float().abs().max()) for start in range(0, layer.d_in, columns)),
                 default=0.0) if weight.element_size() == 1 else float(weight.abs().max())
    if update_bound(layer) + widest <= limit:
        return None
    up = layer.up.float() * layer.scale
    for start in range(0, layer.d_in, columns):
        block = weight[:, start:start + columns].float().to(up.device)
        largest = float(block.addmm(up, layer.down[:, start:start + columns].float().to(up.device)).abs().max())
        if not largest <= limit:  # over the limit, Inf or NaN
            return largest
    return None
