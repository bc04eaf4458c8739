"""ZipLoRA's factored branch (hypernet/ziplora.py) against the dense rule, without ComfyUI: a toy two-layer model
stands in for the UNet (the host tests run the real one)."""

import pytest
import torch

from devkit.dense_rule import dense_ziplora_linear, dense_ziplora_objective, dense_ziplora_update
from hypernet.lora_io import LowRankLayer
from hypernet.ziplora import ZipLoraMerge, optimisation_step, ziplora_loss


def _layer(d_out, d_in, rank, seed, scale=1.0, kernel=()):
    generator = torch.Generator().manual_seed(seed)
    return LowRankLayer(torch.randn(d_out, rank, generator=generator) * 0.3,
                        torch.randn(rank, d_in, generator=generator) * 0.3, scale, kernel)


def _dense(layer: LowRankLayer) -> torch.Tensor:
    return layer.up.double() @ layer.down.double() * layer.scale


def _pair():
    subject = {"a": _layer(6, 5, 2, 1, 0.5), "b": _layer(4, 6, 3, 2), "only": _layer(4, 6, 2, 9)}
    style = {"a": _layer(6, 5, 3, 3, 2.0), "b": _layer(4, 6, 1, 4)}
    return subject, style


def _perturbed(merge, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in merge.coefficient_parameters():
            parameter.add_(0.4 * torch.randn(parameter.shape, generator=generator))


def test_branch_and_merged_layer_equal_the_dense_update_in_every_branch():
    subject, style = _pair()
    merge = ZipLoraMerge(subject, style, subject_strength=0.7, style_strength=1.3)
    _perturbed(merge, 5)
    layer = merge.layers["a"]
    x = torch.randn(3, 7, 5, dtype=torch.float32)
    for branch in ("merged", "subject", "style"):
        update = dense_ziplora_update(_dense(subject["a"]), _dense(style["a"]), layer.m_subject.detach().double(),
                                      layer.m_style.detach().double(), branch, 0.7, 1.3)
        with merge.branch(branch):
            got = layer.extra(x)
        assert torch.allclose(got.double(), x.double() @ update.T, rtol=1e-5, atol=1e-6), branch
    with merge.branch("off"):
        assert layer.extra(x) is None
    merged = layer.merged_layer()
    assert merged.rank == 5 and torch.allclose(_dense(merged), dense_ziplora_update(
        _dense(subject["a"]), _dense(style["a"]), layer.m_subject.detach().double(), layer.m_style.detach().double(),
        "merged", 0.7, 1.3), atol=1e-6)


def test_a_1x1_conv_lora_adds_what_the_same_linear_lora_adds():
    """The injector hands every branch channels-last rows, a 1x1 conv's too (its (B, H, W, d_in)); the factors of
    a 1x1-kernel LoRA apply to them as a linear LoRA's do (the injector on SD 1.5's 1x1 convs:
    tests/host/test_runtime_method_plugin.py)."""
    conv = ZipLoraMerge({"c": _layer(4, 6, 2, 1, kernel=(1, 1))}, {"c": _layer(4, 6, 2, 2, kernel=(1, 1))})
    linear = ZipLoraMerge({"c": _layer(4, 6, 2, 1)}, {"c": _layer(4, 6, 2, 2)})
    _perturbed(conv, 3)
    _perturbed(linear, 3)
    x = torch.randn(2, 3, 3, 6)
    assert conv.layers["c"].extra(x).shape == (2, 3, 3, 4)
    assert torch.allclose(conv.layers["c"].extra(x), linear.layers["c"].extra(x))


class _Toy(torch.nn.Module):
    """x -> b(gelu(a(x))) + only(gelu(a(x))): stands in for the model the branches are injected into."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.only = torch.nn.Linear(5, 6), torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)

    def forward(self, x, patch):
        hidden = torch.nn.functional.gelu(patch("a", self.a, x))
        return patch("b", self.b, hidden) + patch("only", self.only, hidden)


def test_coefficient_gradient_equals_the_dense_objectives_and_steps_lower_the_loss():
    subject, style = _pair()
    merge = ZipLoraMerge(subject, style, subject_strength=0.9, style_strength=1.1)
    _perturbed(merge, 8)
    toy = _Toy().requires_grad_(False)
    batches = (torch.randn(8, 5), torch.randn(8, 5))

    def branch(name, linear, x):
        extra = merge.layers[name].extra(x)
        return linear(x) if extra is None else linear(x) + extra

    def factored(batch):
        return toy(batch, branch)

    loss = ziplora_loss(merge, factored, *batches)
    grads = torch.autograd.grad(loss.total, merge.coefficient_parameters())

    leaves = {n: (merge.layers[n].m_subject.detach().double().requires_grad_(),
                  merge.layers[n].m_style.detach().double().requires_grad_()) for n in ("a", "b")}
    state = {}

    def dense(name, linear, x):
        dw_t = _dense(style[name]) if name in style else torch.zeros(linear.weight.shape, dtype=torch.float64)
        m_s, m_t = leaves.get(name, (torch.ones(x.shape[-1], dtype=torch.float64),) * 2)
        update = dense_ziplora_update(_dense(subject[name]), dw_t, m_s, m_t, state["branch"], 0.9, 1.1)
        return dense_ziplora_linear(x.double(), linear.weight.double(), linear.bias.double(), update)

    def predict(branch, side):
        state["branch"] = branch
        return toy(batches[0 if side == "subject" else 1], dense)

    dense_loss = dense_ziplora_objective(predict, list(leaves.values()), 0.01)
    dense_grads = torch.autograd.grad(dense_loss, [m for pair in leaves.values() for m in pair])
    assert abs(float(loss.total.detach()) - float(dense_loss.detach())) <= 1e-5 * float(dense_loss.detach())
    for grad, expected in zip(grads, dense_grads):
        assert float((grad.double() - expected).norm() / expected.norm()) <= 1e-4

    optimizer = torch.optim.Adam(merge.coefficient_parameters(), lr=0.05)
    first = optimisation_step(merge, optimizer, lambda: ziplora_loss(merge, factored, *batches)).as_floats()
    for _ in range(4):
        optimisation_step(merge, optimizer, lambda: ziplora_loss(merge, factored, *batches))
    assert ziplora_loss(merge, factored, *batches).as_floats()["total"] < first["total"]


def test_similarity_is_a_sum_of_absolute_cosines_and_one_side_layers_have_no_coefficients():
    subject, style = _pair()
    merge = ZipLoraMerge(subject, style)
    assert float(merge.similarity().detach()) == pytest.approx(2.0)  # both m start at 1: cos 1 per layer, summed
    assert not merge.layers["only"].trainable and len(merge.coefficient_parameters()) == 4
    with torch.no_grad():
        merge.layers["a"].m_style.neg_()
    assert float(merge.similarity().detach()) == pytest.approx(2.0)  # |cos| = 1 for opposite vectors too
    assert {n: tuple(c.shape) for n, c in merge.coefficients().items()} == {"a": (5, 2), "b": (6, 2)}


def test_forward_backward_and_conversion_never_form_a_dense_update():
    """An SDXL-width layer: no aten op during the merged forward, the coefficient gradient or the conversion
    returns anything near d_out x d_in (the activations here are 64 tokens)."""
    from tests.unit.test_no_dense_update import LargestOutputs

    merge = ZipLoraMerge({"q": _layer(1280, 1280, 16, 1)}, {"q": _layer(1280, 1280, 8, 2)})
    x = torch.randn(1, 64, 1280)
    with LargestOutputs() as seen:
        out = merge.layers["q"].extra(x)
        loss = out.square().mean() + 0.01 * merge.similarity()
        torch.autograd.grad(loss, merge.coefficient_parameters())
        merge.merged_layers()
    assert seen.largest[0] < 1280 * 1280 // 4, seen.largest
