"""``python -m hypernet merge --base any`` on random LoRAs of the synthetic Flux and SD3.5 (devkit.synthetic_dit).

Two formats per family: a kohya + ComfyUI-generic pair (one factor pair per fused native linear) and a PEFT
pair (split q/k/v pieces). Each layer of the written file equals the method's dense formula on the inputs'
layers of that name. A host test because building the model files needs ComfyUI's detection (the merge itself
imports no comfy; the files' headers give the shapes).

The written file then loads with ComfyUI's stock ``comfy.sd.load_lora_for_models`` on those models (loaded as
tests/host/test_synthetic_dit.py loads them): it patches exactly the native linears the input LoRAs train, fused
q/k/v pieces included, and each weight changes by the merged update: for direct, a * dW_subject + b * dW_style
computed densely from the inputs; for NP-LoRA, the update the written factors give (their values are checked
against the dense formula above).
"""

import pytest
import torch

from devkit import synthetic_dit
from devkit.dit_loras import dense_updates, random_dit_lora, write_lora
from devkit.synthetic_dit import FAMILIES
from hypernet.lora_io import split_key
from tests.host.test_synthetic_dit import _skip_if_host_lacks, _weight_deltas, dit_host, patchers  # noqa: F401
from tests.unit.test_merge_cli import STRENGTHS, assert_golden, dense_layers, merge, run_cli

pytestmark = pytest.mark.host

PAIRS = {"kohya": ("kohya", "comfy"), "peft": ("peft", "peft")}  # pair name -> (subject format, style format)


@pytest.fixture(scope="module")
def dit_root():
    return synthetic_dit.ensure_dit()


def write_pair(tmp_path, family, pair, root):
    """(subject file, style file) of ``family`` in the formats of ``pair``: ranks 4 and 2, alphas where written."""
    subject_fmt, style_fmt = PAIRS[pair]
    subject = write_lora(tmp_path / f"subject-{subject_fmt}.safetensors",
                         random_dit_lora(family, subject_fmt, rank=4, seed=11, alpha=2.0, root=root))
    style = write_lora(tmp_path / f"style-{style_fmt}.safetensors",
                       random_dit_lora(family, style_fmt, rank=2, seed=12, alpha=8.0, root=root))
    return subject, style


def as_written(layers: dict) -> dict:
    """ComfyUI-generic stems under the kohya name the CLI writes for them; other stems as they are."""
    return {("lora_unet_" + stem.removeprefix("diffusion_model.").replace(".", "_")
             if stem.startswith("diffusion_model.") else stem): update for stem, update in layers.items()}


@pytest.mark.parametrize("method", ["direct", "np-lora"])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_written_layer_is_the_methods_formula(dit_root, tmp_path, name, pair, method):
    subject, style = write_pair(tmp_path, FAMILIES[name], pair, dit_root)

    out = merge(tmp_path, subject, style, method, "--base", "any")

    subject_layers, style_layers = as_written(dense_layers(subject)), as_written(dense_layers(style))
    assert set(subject_layers) == set(style_layers) and len(subject_layers) >= 15  # every layer in both
    assert_golden(method, out, subject_layers, style_layers)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_and_split_files_of_one_model_are_refused_by_name(dit_root, tmp_path, name):
    family = FAMILIES[name]
    subject = write_lora(tmp_path / "fused.safetensors", random_dit_lora(family, "kohya", seed=1, root=dit_root))
    style = write_lora(tmp_path / "split.safetensors", random_dit_lora(family, "peft", seed=2, root=dit_root))
    out = tmp_path / "never.safetensors"

    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, "--method", "np-lora",
                     weights_dir=tmp_path)

    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not out.exists()
    assert "share no layer name" in result.stderr and "ComfyUI node" in result.stderr

# ------------------------------------------------------------------ the written file through ComfyUI's loader

_AS_INPUT = {"up": "lora_B.weight", "down": "lora_A.weight"}  # the written roles in the PEFT spelling


def written_as(fmt: str, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The written file in the input format ``fmt`` (kohya: as it is; peft: lora_up/down as lora_B/A, alpha = rank
    so scale 1), for devkit.dit_loras.dense_updates to place each layer on its native rows."""
    if fmt == "kohya":
        return merged
    out = {}
    for key, tensor in merged.items():
        stem, role = split_key(key)
        if role in _AS_INPUT:
            out[f"{stem}.{_AS_INPUT[role]}"] = tensor
    return out


def expected_updates(family, pair, method, subject, style, merged, root) -> dict[str, torch.Tensor]:
    """Model weight key -> the change the merged LoRA must make to it."""
    subject_fmt, style_fmt = PAIRS[pair]
    if method == "direct":
        a, b = STRENGTHS
        trained_s, trained_t = dense_updates(family, subject_fmt, subject, root), dense_updates(family, style_fmt, style, root)
        updates = {key: a * trained_s[key] + b * trained_t[key] for key in trained_s}
    else:
        updates = dense_updates(family, subject_fmt, written_as(subject_fmt, merged), root)
    return {f"diffusion_model.{key}": update for key, update in updates.items()}


@pytest.mark.parametrize("method", ["direct", "np-lora"])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_merged_file_patches_the_trained_linears_with_the_merged_update(dit_host, patchers, tmp_path, name,
                                                                            pair, method):
    import comfy.sd
    import comfy.utils

    version, root = dit_host
    family = FAMILIES[name]
    _skip_if_host_lacks(family, version)
    subject, style = write_pair(tmp_path, family, pair, root)
    out = merge(tmp_path, subject, style, method, "--base", "any")
    inputs = [comfy.utils.load_torch_file(str(path)) for path in (subject, style, out)]
    expected = expected_updates(family, pair, method, *inputs, root)
    trained = {f"diffusion_model.{key}" for key in dense_updates(family, PAIRS[pair][0], inputs[0], root)}

    patched, _ = comfy.sd.load_lora_for_models(patchers[name][0], None, inputs[2], 1.0, 0.0)

    assert set(patched.patches) == trained == set(expected)
    deltas = _weight_deltas(patched, list(expected))
    assert set(deltas) == set(expected)
    for key, update in expected.items():
        torch.testing.assert_close(deltas[key], update, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
