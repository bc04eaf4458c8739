"""The factored merge against a plain dense implementation of the published LoRA.rar rule."""

import pytest
import torch

from hypernet.base_models import KOALA_700M, SDXL
from hypernet.keys import attention_role, sgm_to_canonical
from hypernet.lora_io import read_lora
from hypernet.merge import Strengths, merge_loras
from hypernet.methods.lorarar import lorarar_coefficients
from hypernet.model import LoraRarHypernet
from devkit.dense_rule import dense_rule, dense_update
from devkit.loras import random_lora, write_lora
from devkit.weights import hypernet_file

CHECKPOINTS = {"sdxl": (hypernet_file("sdxl"), SDXL), "koala-700m": (hypernet_file("koala-700m"), KOALA_700M)}


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


# Both compute branches: layer by layer (the CPU's), and same-shape layers through H together (what runs on
# an accelerator; hypernet.pipeline.use_batched decides), forced here on the CPU.
BRANCHES = pytest.mark.parametrize("batched", [False, True], ids=["per-layer", "batched"])


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_every_layer_matches_dense_rule(checkpoint, shared_weights, tmp_path):
    """Both compute branches against one float64 dense reference per layer: the reference (not the merges) is what
    costs here, a minute for SDXL's 560 layers, so it is computed once and each branch is held to it."""
    file_name, layout = CHECKPOINTS[checkpoint]
    hypernet_path = shared_weights / file_name
    hypernet = LoraRarHypernet.load(hypernet_path)
    state = torch.load(hypernet_path, weights_only=True, map_location="cpu")
    # different ranks, a stored alpha on one side only
    subject_sd = random_lora(layout, rank=8, seed=1, alpha=4.0)
    style_sd = random_lora(layout, rank=5, seed=2)
    subject = read_lora(write_lora(tmp_path / "subject.safetensors", subject_sd), layout)
    style = read_lora(write_lora(tmp_path / "style.safetensors", style_sd), layout)

    branches = {name: merge_loras(subject, style, hypernet, layout=layout, batched=batched)
                for name, batched in (("per-layer", False), ("batched", True))}

    linears = layout.attention_linears()
    for merged in branches.values():
        assert len(merged.layers) == len(linears)
        assert merged.report.hypernet_layers == len(linears) // 2
    worst = dict.fromkeys(branches, 0.0)
    for module, d_out, d_in in linears:
        stem = sgm_to_canonical(module)
        expected = dense_rule(state, dense_update(subject_sd, stem), dense_update(style_sd, stem), attention_role(stem))
        for name, merged in branches.items():
            layer = merged.layers[stem]
            assert layer.rank == 13 and layer.up.shape == (d_out, 13) and layer.down.shape == (13, d_in), (name, stem)
            actual = (layer.up.double() @ layer.down.double()) * layer.scale
            worst[name] = max(worst[name], relative_error(actual, expected))
    assert all(error <= 1e-5 for error in worst.values()), worst


@BRANCHES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_and_conv_shaped_inputs(dtype, batched, shared_weights, tmp_path):
    """fp16/bf16 factors and 1x1-conv-shaped tensors: same rule, computed in float32 from the stored values."""
    state = torch.load(shared_weights / hypernet_file("sdxl"), weights_only=True, map_location="cpu")
    hypernet = LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))
    modules = [m for m, _, _ in SDXL.attention_linears() if m.startswith("input_blocks.4.") or m.startswith("middle_block.1.transformer_blocks.3.")]
    subject_sd = random_lora(rank=16, seed=3, dtype=dtype, modules=modules, conv=True, alpha=8.0)
    style_sd = random_lora(rank=4, seed=4, dtype=dtype, modules=modules)
    subject = read_lora(write_lora(tmp_path / "s.safetensors", subject_sd))
    style = read_lora(write_lora(tmp_path / "t.safetensors", style_sd))
    merged = merge_loras(subject, style, hypernet, dtype=torch.float32, batched=batched)
    assert merged.report.hypernet_layers == len(modules) // 2
    for module in modules:
        stem = sgm_to_canonical(module)
        expected = dense_rule(state, dense_update(subject_sd, stem), dense_update(style_sd, stem), attention_role(stem))
        layer = merged.layers[stem]
        assert layer.kernel == (1, 1)
        assert relative_error(layer.up.double() @ layer.down.double(), expected) <= 1e-5


@BRANCHES
def test_strengths_scale_each_side_after_the_hypernet(batched, shared_weights, tmp_path):
    hypernet = LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))
    modules = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_k"]
    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(rank=4, seed=5, modules=modules)))
    style = read_lora(write_lora(tmp_path / "t.safetensors", random_lora(rank=4, seed=6, modules=modules)))
    q = sgm_to_canonical(modules[0])
    coefficients = lorarar_coefficients(hypernet, subject.layers[q], style.layers[q])
    merged = merge_loras(subject, style, hypernet, strengths=Strengths(subject_model=0.5, style_model=2.0), batched=batched)
    dw_s = subject.layers[q].up @ subject.layers[q].down
    dw_t = style.layers[q].up @ style.layers[q].down
    expected = 0.5 * dw_s * coefficients[:, 0] + 2.0 * dw_t * coefficients[:, 1]
    layer = merged.layers[q]
    assert relative_error(layer.up @ layer.down, expected) <= 1e-5


# the no-dense-update guard lives in test_no_dense_update.py (every aten op of a full SDXL merge is watched)
