"""Regression guard, not a timed test: merging low-rank LoRAs never allocates a dense d_out x d_in update.

Every aten op run during a full SDXL merge is seen through a TorchDispatchMode, so a dense product formed
by any route (matmul, einsum, outer broadcasting, a view materialised by a copy) fails the test.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hypernet import methods
from hypernet.base_models import SDXL
from hypernet.lora_io import read_lora
from hypernet.merge import merge_loras, merge_many
from hypernet.methods.lorarar import lorarar_coefficients, lorarar_coefficients_batched
from hypernet.model import LoraRarHypernet
from devkit.loras import random_lora, write_lora
from devkit.weights import hypernet_file
from tests.support.calibration import TokenCalibration

HIDDEN = 128


class LargestOutputs(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns (the op's name with the largest)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest[0]:
                self.largest = (tensor.numel(), str(func))
        return result


def _pair(tmp_path, rank, dtype=torch.float32, style_rank=None):
    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(rank=rank, seed=7, dtype=dtype, alpha=rank / 2)))
    style = read_lora(write_lora(tmp_path / "t.safetensors", random_lora(rank=style_rank or rank, seed=8, dtype=dtype)))
    return subject, style


@pytest.fixture(scope="module")
def sdxl_hypernet(shared_weights):
    return LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))


@pytest.mark.parametrize("method", ["lorarar", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_sdxl_merge_never_forms_a_dense_update(sdxl_hypernet, tmp_path, method, dtype):
    rank = 16
    subject, style = _pair(tmp_path, rank, dtype)
    smallest_dense = min(d_out * d_in for _, d_out, d_in in SDXL.attention_linears())  # 640 x 640
    # the largest tensors a factored merge needs: H's hidden layer (128, d_in <= 1280 for to_q/to_out)
    # and the merged factors (d_out or d_in <= 2048, 2 * rank)
    allowed = max(HIDDEN * 1280, 2048 * 2 * rank)
    assert allowed < smallest_dense

    with LargestOutputs() as watch:
        merged = merge_loras(subject, style, sdxl_hypernet, method=method)

    assert len(merged.layers) == len(SDXL.attention_linears())
    numel, op = watch.largest
    assert 0 < numel <= allowed, f"{op} returned {numel} elements: a dense update ({smallest_dense}+) was formed"


# one transformer block in each of the two SDXL widths and the two B-LoRA blocks: every method has layers to work on
SOME_MODULES = [m for m, _, _ in SDXL.attention_linears()
                if m.startswith(("input_blocks.4.1.transformer_blocks.0.", "output_blocks.0.1.transformer_blocks.0.",
                                 "output_blocks.1.1.transformer_blocks.0.", "middle_block.1.transformer_blocks.0."))]


@pytest.mark.parametrize("name", [m.name for m in methods.all_methods() if not m.needs_model])
def test_no_registered_method_forms_a_dense_update(sdxl_hypernet, tmp_path, name):
    """Every method a merge runs from the files alone (a new one included, whatever it computes: K-LoRA's top-k and
    L1 in slabs of columns, EST-LoRA's Gram matrices): no op returns a d_out x d_in tensor."""
    method = methods.get(name)
    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(rank=8, seed=7, modules=SOME_MODULES, alpha=4)))
    style = read_lora(write_lora(tmp_path / "t.safetensors", random_lora(rank=6, seed=8, modules=SOME_MODULES)))
    smallest_dense = min(d_out * d_in for m, d_out, d_in in SDXL.attention_linears() if m in SOME_MODULES)
    with LargestOutputs() as watch:
        merged = merge_loras(subject, style, sdxl_hypernet if method.needs_hypernet else None, method=name, layout=SDXL)
    assert merged.layers or merged.runtime is not None
    numel, op = watch.largest
    assert 0 < numel < smallest_dense, f"{name}: {op} returned {numel} elements: a dense update ({smallest_dense}+) was formed"


@pytest.mark.parametrize("name", [m.name for m in methods.all_methods() if m.needs_model and not m.needs_references])
def test_no_calibrated_method_forms_a_dense_update(tmp_path, name):
    """A method that calibrates on the model (SSR-Merge): its statistics, router and merge from the factors alone. The
    tokens stand in for a model's (tests/support/calibration.py), 16 per layer and LoRA, at SDXL's real widths."""
    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(rank=8, seed=7, modules=SOME_MODULES, alpha=4)))
    style = read_lora(write_lora(tmp_path / "t.safetensors", random_lora(rank=6, seed=8, modules=SOME_MODULES)))
    generator = torch.Generator().manual_seed(9)
    tokens = {side: {layer: torch.randn(1, 16, subject.layers[layer].d_in, generator=generator) for layer in subject.layers}
              for side in ("subject", "style")}
    smallest_dense = min(d_out * d_in for m, d_out, d_in in SDXL.attention_linears() if m in SOME_MODULES)
    with LargestOutputs() as watch:
        merged = merge_loras(subject, style, None, method=name, layout=SDXL, calibration=TokenCalibration(tokens))
    assert len(merged.layers) == len(subject.layers)
    numel, op = watch.largest
    assert 0 < numel < smallest_dense, f"{name}: {op} returned {numel} elements: a dense update ({smallest_dense}+) was formed"


def test_guard_catches_a_dense_update(sdxl_hypernet, tmp_path):
    """The watcher itself works: forming dW = up @ down for one layer is seen."""
    subject, _ = _pair(tmp_path, 4)
    layer = next(iter(subject.layers.values()))
    with LargestOutputs() as watch:
        layer.up @ layer.down
    assert watch.largest[0] == layer.d_out * layer.d_in


def test_merge_many_reuses_the_subject_and_matches_separate_merges(sdxl_hypernet, tmp_path):
    modules = [m for m, _, _ in SDXL.attention_linears() if m.startswith(("input_blocks.4.", "output_blocks.2."))]
    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(rank=8, seed=1, modules=modules)))
    styles = [read_lora(write_lora(tmp_path / f"t{i}.safetensors", random_lora(rank=4 + i, seed=10 + i, modules=modules)))
              for i in range(3)]
    together = merge_many(subject, styles, sdxl_hypernet)
    for style, merged in zip(styles, together):
        alone = merge_loras(subject, style, sdxl_hypernet)
        assert list(merged.layers) == list(alone.layers)
        assert merged.report.actions == alone.report.actions and merged.sources == alone.sources
        for name, layer in alone.layers.items():
            torch.testing.assert_close(merged.layers[name].up, layer.up, rtol=0, atol=0)
            torch.testing.assert_close(merged.layers[name].down, layer.down, rtol=1e-6, atol=1e-9)


def test_merge_many_batched_glue_matches_per_layer_merges(sdxl_hypernet, tmp_path):
    """The accelerator branch's glue in merge_many, forced on the CPU: deferred hypernet layers, several styles,
    mixed ranks (per layer too), layers in one LoRA only, summed to_k/to_v, and a text-encoder layer."""
    modules = [m for m, _, _ in SDXL.attention_linears() if m.startswith(("input_blocks.4.", "output_blocks.2.", "middle_block"))]
    subject_sd = random_lora(rank=8, seed=1, modules=modules)
    subject_sd.update(random_lora(rank=3, seed=2, modules=modules[:4], fmt="kohya"))  # other ranks on some layers
    subject_sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(3072, 2) * 0.02
    subject_sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 768) * 0.02
    subject = read_lora(write_lora(tmp_path / "s.safetensors", subject_sd))
    styles = [read_lora(write_lora(tmp_path / f"t{i}.safetensors",
                                   random_lora(rank=4 + 3 * i, seed=10 + i, modules=modules[i:len(modules) - i])))
              for i in range(3)]
    together = merge_many(subject, styles, sdxl_hypernet, batched=True)
    for style, merged in zip(styles, together):
        alone = merge_loras(subject, style, sdxl_hypernet, batched=False)
        assert list(merged.layers) == list(alone.layers)
        assert merged.report.actions == alone.report.actions and merged.report.hypernet_layers > 0
        assert {"summed", "kept (subject)"} <= set(alone.report.actions.values())
        assert merged.report.as_dict()["coefficients"] == pytest.approx(alone.report.as_dict()["coefficients"], rel=1e-5)
        for name, layer in alone.layers.items():
            torch.testing.assert_close(merged.layers[name].up, layer.up, rtol=0, atol=0)
            torch.testing.assert_close(merged.layers[name].down, layer.down, rtol=1e-5, atol=1e-7)


def test_batched_coefficients_match_the_per_layer_path(sdxl_hypernet, tmp_path):
    subject, style = _pair(tmp_path, 6, style_rank=3)
    pairs = [(subject.layers[name], style.layers[name]) for name in subject.layers
             if name.endswith(("to_q", "to_out_0"))]
    batched = lorarar_coefficients_batched(sdxl_hypernet, pairs)
    assert len(batched) == len(pairs) == 280
    for (s_layer, t_layer), coefficients in zip(pairs, batched):
        torch.testing.assert_close(coefficients, lorarar_coefficients(sdxl_hypernet, s_layer, t_layer), rtol=1e-5, atol=1e-6)
