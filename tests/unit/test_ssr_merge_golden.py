"""SSR-Merge against a plain dense implementation of its published rule, written here: random factors and random
calibration tokens per layer, z = A x, G from every token, Q's rows of LoRA k from LoRA k's own tokens, R = Q G^-1 by
an explicit inverse in float64, dW' = B R A formed densely; and the rule's own sanity case (tokens that excite only
their own LoRA give R -> I). The tokens reach the method through its own calibration branch, as a host's model
would hand them over (the host test, tests/host/test_ssr_merge.py, records them from ComfyUI's KSampler)."""

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.layers import LoraFile, LowRankLayer
from hypernet.merge import Strengths, merge_loras
from tests.support.calibration import TokenCalibration

D_IN, D_OUT = 12, 7
NAMES = ("lora_unet_q", "lora_unet_out")


def _layer(rank: int, seed: int, scale: float = 1.0, mask: slice | None = None) -> LowRankLayer:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, D_IN, generator=generator, dtype=torch.float64) * 0.5
    if mask is not None:  # the down factor reads only these input dims
        keep = torch.zeros(D_IN, dtype=torch.float64)
        keep[mask] = 1.0
        down = down * keep
    return LowRankLayer(torch.randn(D_OUT, rank, generator=generator, dtype=torch.float64).float(), down.float(), scale)


def _tokens(count: int, seed: int, mask: slice | None = None) -> torch.Tensor:
    x = torch.randn(1, count, D_IN, generator=torch.Generator().manual_seed(seed))
    if mask is not None:
        x[..., [i for i in range(D_IN) if i not in range(*mask.indices(D_IN))]] = 0.0
    return x


def dense_rule(subject: LowRankLayer, style: LowRankLayer, tokens: dict, ridge: float,
               weights=(1.0, 1.0)) -> torch.Tensor:
    """dW' = B Q G^-1 diag(w) A, every matrix dense, float64."""
    down = torch.cat([subject.down.double(), style.down.double()])
    up = torch.cat([subject.up.double() * subject.scale, style.up.double() * style.scale], dim=1)
    rows = {"subject": slice(0, subject.rank), "style": slice(subject.rank, subject.rank + style.rank)}
    total = down.shape[0]
    gram, cross, count = torch.zeros(total, total, dtype=torch.float64), torch.zeros(total, total, dtype=torch.float64), 0
    for side, x in tokens.items():
        z = x.reshape(-1, D_IN).double() @ down.T
        gram += z.T @ z
        cross[rows[side]] += (z.T @ z)[rows[side]]
        count += z.shape[0]
    router = (cross / count) @ torch.linalg.inv(gram / count + ridge * torch.eye(total, dtype=torch.float64))
    strengths = torch.cat([torch.full((subject.rank,), weights[0]), torch.full((style.rank,), weights[1])]).double()
    return up @ router @ torch.diag(strengths) @ down


def _merge(subject_layers, style_layers, tokens, ridge=1e-4, strengths=Strengths()):
    calibration = TokenCalibration(tokens)
    merged = merge_loras(LoraFile("dog.safetensors", "s" * 64, subject_layers),
                         LoraFile("ink.safetensors", "t" * 64, style_layers), None, "ssr-merge", "sum", strengths,
                         params={"ridge": ridge}, calibration=calibration)
    return merged, calibration


def _dense(layer: LowRankLayer) -> torch.Tensor:
    return layer.up.double().flatten(1) @ layer.down.double().flatten(1) * layer.scale


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_every_routed_layer_is_the_dense_rule():
    subject = {"lora_unet_q": _layer(3, 1, scale=0.5), "lora_unet_out": _layer(2, 2)}
    style = {"lora_unet_q": _layer(4, 3), "lora_unet_out": _layer(5, 4, scale=2.0)}
    tokens = {"subject": {name: _tokens(40, 10 + i) for i, name in enumerate(NAMES)},
              "style": {name: _tokens(25, 20 + i) * 2.0 for i, name in enumerate(NAMES)}}
    merged, calibration = _merge(subject, style, tokens)
    assert calibration.runs == 1  # one load, both LoRAs' steps inside it
    for name in NAMES:
        layer = merged.layers[name]
        assert layer.rank == subject[name].rank + style[name].rank  # B R, A: never dense
        expected = dense_rule(subject[name], style[name], {side: tokens[side][name] for side in tokens}, 1e-4)
        assert _relative(_dense(layer), expected) <= 1e-5, name


def test_strengths_scale_each_loras_rows_after_the_router():
    subject, style = {"lora_unet_q": _layer(3, 5)}, {"lora_unet_q": _layer(2, 6)}
    tokens = {"subject": {"lora_unet_q": _tokens(30, 7)}, "style": {"lora_unet_q": _tokens(30, 8)}}
    merged, _ = _merge(subject, style, tokens, strengths=Strengths(0.5, 1.5, 1.0, 1.0))
    expected = dense_rule(subject["lora_unet_q"], style["lora_unet_q"],
                          {side: tokens[side]["lora_unet_q"] for side in tokens}, 1e-4, (0.5, 1.5))
    assert _relative(_dense(merged.layers["lora_unet_q"]), expected) <= 1e-5


def test_tokens_that_excite_only_their_own_lora_route_to_the_identity():
    """A_j x = 0 for the tokens of LoRA k (j != k): Q = G - lambda I, so R -> I and dW' -> the sum as lambda -> 0."""
    first, second = slice(0, 6), slice(6, 12)
    subject, style = {"lora_unet_q": _layer(3, 11, mask=first)}, {"lora_unet_q": _layer(3, 12, mask=second)}
    tokens = {"subject": {"lora_unet_q": _tokens(50, 13, first)}, "style": {"lora_unet_q": _tokens(50, 14, second)}}
    merged, _ = _merge(subject, style, tokens, ridge=1e-12)
    direct = _dense(subject["lora_unet_q"]) + _dense(style["lora_unet_q"])
    assert _relative(_dense(merged.layers["lora_unet_q"]), direct) <= 1e-5


def test_a_lora_of_zeros_one_side_only_and_no_tokens():
    subject = {"lora_unet_q": _layer(3, 15), "lora_unet_out": _layer(2, 16), "lora_unet_subject_only": _layer(2, 17)}
    zero = LowRankLayer(torch.zeros(D_OUT, 4), torch.zeros(4, D_IN), 1.0)
    style = {"lora_unet_q": zero, "lora_unet_out": _layer(3, 18)}
    # lora_unet_out gets no token: R = I, the direct sum; the zero style's G block is 0 before the ridge
    tokens = {"subject": {"lora_unet_q": _tokens(30, 19), "lora_unet_subject_only": _tokens(5, 21)},
              "style": {"lora_unet_q": _tokens(30, 20)}}
    merged, _ = _merge(subject, style, tokens)
    routed = merged.layers["lora_unet_q"]
    assert torch.isfinite(routed.up).all() and torch.isfinite(routed.down).all()
    expected = dense_rule(subject["lora_unet_q"], zero, {side: tokens[side]["lora_unet_q"] for side in tokens}, 1e-4)
    assert _relative(_dense(routed), expected) <= 1e-5
    assert _relative(_dense(merged.layers["lora_unet_out"]),
                     _dense(subject["lora_unet_out"]) + _dense(style["lora_unet_out"])) <= 1e-6
    assert _relative(_dense(merged.layers["lora_unet_subject_only"]), _dense(subject["lora_unet_subject_only"])) <= 1e-6
    assert merged.report.actions["lora_unet_subject_only"] == "kept (subject)"


def test_tokens_that_are_not_finite_stop_the_merge_in_one_line():
    subject, style = {"lora_unet_q": _layer(3, 22)}, {"lora_unet_q": _layer(2, 23)}
    bad = _tokens(10, 24)
    bad[0, 3, 5] = float("nan")
    with pytest.raises(LoraRarError, match=r"^ssr-merge: the style LoRA's calibration step gave activations that are "
                                           r"not finite at layer lora_unet_q") as error:
        _merge(subject, style, {"subject": {"lora_unet_q": _tokens(10, 25)}, "style": {"lora_unet_q": bad}})
    assert "\n" not in str(error.value)


def test_without_a_model_it_is_refused_in_one_line():
    subject, style = {"lora_unet_q": _layer(3, 26)}, {"lora_unet_q": _layer(2, 27)}
    with pytest.raises(LoraRarError, match="^ssr-merge: it runs the model before it merges"):
        merge_loras(LoraFile("a", "s" * 64, subject), LoraFile("b", "t" * 64, style), None, "ssr-merge")
