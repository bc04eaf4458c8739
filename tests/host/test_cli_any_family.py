"""``python -m hypernet merge --base any`` on random LoRAs of the synthetic Flux and SD3.5 (devkit.synthetic_dit).

Two formats per family: a kohya + ComfyUI-generic pair (one factor pair per fused native linear) and a PEFT
pair (split q/k/v pieces). Each layer of the written file equals the method's dense formula on the inputs'
layers of that name. A host test only because building the model files needs ComfyUI's detection (the
merge itself imports no comfy; the files' headers give the shapes).
"""

import pytest

from devkit import synthetic_dit
from devkit.dit_loras import random_dit_lora, write_lora
from devkit.synthetic_dit import FAMILIES
from tests.unit.test_cli import run_cli
from tests.unit.test_cli_any_family import assert_golden, dense_layers, merge

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
