"""The overflow check of a merged patch on a model whose weights are float8 (weight_dtype fp8 in ComfyUI)."""

import pytest
import torch


def test_the_overflow_check_reads_float8_model_weights():
    # a model loaded with weight_dtype fp8 (common for Flux): the check must read those weights, not crash on them
    from hypernet.lora_io import LowRankLayer
    from hypernet.lowrank import patched_overflow

    weight = (torch.randn(96, 32) * 0.1).to(torch.float8_e4m3fn)
    small = LowRankLayer(up=torch.full((96, 2), 0.1), down=torch.full((2, 32), 0.1), scale=1.0)
    huge = LowRankLayer(up=torch.full((96, 2), 300.0), down=torch.full((2, 32), 300.0), scale=1.0)
    assert patched_overflow(small, weight, torch.float16) is None
    assert patched_overflow(huge, weight, torch.float16) == pytest.approx(180000, rel=0.01)
