"""NP-LoRA and B-LoRA against dense implementations of their published formulas, written here."""

import pytest
import torch

from devkit.dense_rule import dense_np_lora
from devkit.loras import random_lora
from hypernet.base_models import KOALA_700M, SDXL
from hypernet.errors import LoraRarError
from hypernet.lora_io import lora_from_tensors
from hypernet.merge import Strengths, merge_loras

MODULES = [m for m, _, _ in SDXL.attention_linears()
           if m.startswith(("input_blocks.4.1.transformer_blocks.0.", "output_blocks.0.1.transformer_blocks.1.",
                            "output_blocks.1.1.transformer_blocks.2.", "middle_block.1.transformer_blocks.3."))]


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def dense(lora, name):
    layer = lora.layers[name]
    return (layer.up.double() @ layer.down.double()) * layer.scale


@pytest.fixture
def pair():
    subject = lora_from_tensors(random_lora(rank=8, seed=1, modules=MODULES, alpha=4.0), "subject.safetensors")
    style = lora_from_tensors(random_lora(rank=5, seed=2, modules=MODULES), "style.safetensors")
    return subject, style


@pytest.mark.parametrize("mu", [0.5, 0.0, 3.0])
def test_np_lora_matches_the_dense_projection(mu):
    small = [m for m in MODULES if m.startswith("input_blocks.4.")]  # 640-wide: the dense SVDs stay quick
    subject = lora_from_tensors(random_lora(rank=8, seed=1, modules=small, alpha=4.0), "subject.safetensors")
    style = lora_from_tensors(random_lora(rank=5, seed=2, modules=small), "style.safetensors")
    merged = merge_loras(subject, style, None, method="np-lora", params={"mu": mu}, dtype=torch.float32,
                         strengths=Strengths(0.7, 1.3))
    assert merged.report.count("projected") == len(small) and merged.report.params == {"mu": mu}
    for name, layer in merged.layers.items():
        expected = dense_np_lora(dense(subject, name), dense(style, name), mu, 0.7, 1.3)
        assert layer.rank == 13  # r_subject + r_style: low-rank, never a dense update
        assert relative_error((layer.up.double() @ layer.down.double()) * layer.scale, expected) <= 1e-5


@pytest.mark.parametrize("dead_columns", [2, 5])
def test_np_lora_projects_only_on_directions_the_style_uses(dead_columns):
    """A style whose up factor has untrained (zero) columns has a smaller row space than its down factor spans:
    the subject keeps what lies along the unused down rows (all of it when the style layer is entirely zero)."""
    small = [m for m in MODULES if m.startswith("input_blocks.4.")][:2]
    subject = lora_from_tensors(random_lora(rank=8, seed=1, modules=small, alpha=4.0), "subject.safetensors")
    tensors = random_lora(rank=5, seed=2, modules=small)
    for key in tensors:
        if key.endswith("lora_up.weight"):
            tensors[key][:, :dead_columns] = 0
    style = lora_from_tensors(tensors, "style.safetensors")
    merged = merge_loras(subject, style, None, method="np-lora", dtype=torch.float32)
    for name, layer in merged.layers.items():
        expected = dense_np_lora(dense(subject, name), dense(style, name), 0.5)
        assert relative_error((layer.up.double() @ layer.down.double()) * layer.scale, expected) <= 1e-5


def test_np_lora_removes_the_subjects_overlap_with_the_style_inputs(pair):
    """With mu -> infinity (c -> 1) the subject part has no component left along the style's input directions."""
    subject, style = pair
    merged = merge_loras(subject, style, None, method="np-lora", params={"mu": 100.0}, dtype=torch.float32)
    name = next(iter(merged.layers))
    subject_part = merged.layers[name].down[:8].double()  # the subject's rows come first
    q, _ = torch.linalg.qr(style.layers[name].down.double().T)
    assert float((subject_part @ q).norm() / subject_part.norm()) < 0.02


def test_b_lora_keeps_the_subjects_content_block_and_the_styles_style_block(pair):
    subject, style = pair
    merged = merge_loras(subject, style, None, method="b-lora", layout=SDXL, dtype=torch.float32,
                         strengths=Strengths(0.5, 2.0))
    actions = merged.report.actions
    for name, layer in merged.layers.items():
        got = (layer.up.double() @ layer.down.double()) * layer.scale
        if "output_blocks_0_1_" in name:
            assert actions[name] == "kept (subject)"
            assert relative_error(got, 0.5 * dense(subject, name)) <= 1e-6
        elif "output_blocks_1_1_" in name:
            assert actions[name] == "kept (style)"
            assert relative_error(got, 2.0 * dense(style, name)) <= 1e-6
        else:  # the layer policy (sum) decides the rest
            assert actions[name] == "summed"
            assert relative_error(got, 0.5 * dense(subject, name) + 2.0 * dense(style, name)) <= 1e-5
    assert {"kept (subject)", "kept (style)", "summed"} == set(actions.values())


def test_b_lora_on_a_layout_without_a_published_split_is_a_clear_error():
    subject = lora_from_tensors(random_lora(KOALA_700M, rank=4, seed=3), "k_subject.safetensors", layout=KOALA_700M)
    style = lora_from_tensors(random_lora(KOALA_700M, rank=4, seed=4), "k_style.safetensors", layout=KOALA_700M)
    with pytest.raises(LoraRarError, match="b-lora: no published content/style block split for koala-700m"):
        merge_loras(subject, style, None, method="b-lora", layout=KOALA_700M)
