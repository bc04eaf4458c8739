"""``python -m hypernet merge`` on LoRAs of model families the SDXL parser does not know (``--base any``).

The files are written here with Flux-style layer names in small shapes (no model needed): diffusers / PEFT
names are kept as written, kohya ``lora_unet_`` and ComfyUI ``diffusion_model.`` spellings of one layer pair
up, and each written layer equals the method's dense formula. tests/host/test_cli_any_family.py does the same
on the synthetic Flux and SD3.5 models; tests/host/test_cli_dit_loads.py loads the output in ComfyUI.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypernet.cli import main
from tests.unit.test_cli import run_cli
from devkit.dense_rule import dense_np_lora
from tests.unit.test_methods_golden import relative_error

# Flux diffusers names (PEFT form) -> (out, in): a split q/k, an output projection, an MLP layer
PEFT = {"transformer.transformer_blocks.0.attn.to_q": (24, 16), "transformer.transformer_blocks.0.attn.to_k": (24, 16),
        "transformer.transformer_blocks.0.attn.to_out.0": (16, 24),
        "transformer.single_transformer_blocks.1.proj_mlp": (40, 16)}
NATIVE = {"double_blocks.0.img_attn.qkv": (48, 16), "double_blocks.0.img_attn.proj": (16, 16),
          "single_blocks.1.linear1": (56, 16)}
STRENGTHS = (0.7, 1.3)


def lora_file(path, shapes, *, fmt, rank, seed, alpha=None):
    """A random LoRA in ``fmt`` (peft: lora_B/lora_A; kohya / comfy: lora_up/lora_down/alpha) written to ``path``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in shapes.items():
        up, down = torch.randn(d_out, rank, generator=generator), torch.randn(rank, d_in, generator=generator)
        if fmt == "peft":
            state[f"{module}.lora_B.weight"], state[f"{module}.lora_A.weight"] = up, down
            continue
        stem = "lora_unet_" + module.replace(".", "_") if fmt == "kohya" else f"diffusion_model.{module}"
        state[f"{stem}.lora_up.weight"], state[f"{stem}.lora_down.weight"] = up, down
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def dense_layers(path) -> dict[str, torch.Tensor]:
    """Layer stem as written -> its dense update up @ down * alpha / rank (float64), read back from ``path``."""
    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key).double() for key in f.keys()}
    out = {}
    for key in state:
        for up_suffix, down_suffix in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if key.endswith(up_suffix):
                stem = key[: -len(up_suffix)]
                down = state[stem + down_suffix]
                scale = float(state[f"{stem}.alpha"]) / down.shape[0] if f"{stem}.alpha" in state else 1.0
                out[stem] = state[key] @ down * scale
    return out


def expected(method, subject, style, a=STRENGTHS[0], b=STRENGTHS[1]):
    """The method's dense formula on one layer's two dense updates (None: the layer is in one file only)."""
    if subject is None or style is None:
        return a * subject if style is None else b * style
    if method == "direct":
        return a * subject + b * style
    return dense_np_lora(subject, style, 0.5, a, b)


def merge(tmp_path, subject, style, method, *extra):
    out = tmp_path / f"{method}.safetensors"
    code = main(["merge", "--subject", str(subject), "--style", str(style), "--out", str(out), "--method", method,
                 "--subject-strength", str(STRENGTHS[0]), "--style-strength", str(STRENGTHS[1]), "--dtype", "fp32",
                 "--overwrite", *extra])
    assert code == 0
    return out


def assert_golden(method, out, subject_layers, style_layers):
    merged = dense_layers(out)
    assert set(merged) == set(subject_layers) | set(style_layers)
    for name, update in merged.items():
        reference = expected(method, subject_layers.get(name), style_layers.get(name))
        assert relative_error(update, reference) <= 1e-5, name


@pytest.mark.parametrize("method", ["direct", "np-lora"])
@pytest.mark.parametrize("base", [[], ["--base", "any"]], ids=["default", "any"])
def test_peft_names_are_kept_and_each_layer_is_the_methods_formula(tmp_path, capsys, method, base):
    subject_only = {"transformer.transformer_blocks.0.ff.net.2": (16, 64)}
    subject = lora_file(tmp_path / "subject.safetensors", {**PEFT, **subject_only}, fmt="peft", rank=4, seed=1)
    style = lora_file(tmp_path / "style.safetensors", PEFT, fmt="peft", rank=3, seed=2)

    out = merge(tmp_path, subject, style, method, *base)

    assert_golden(method, out, dense_layers(subject), dense_layers(style))
    with safe_open(str(out), framework="pt") as f:  # written as <stem>.lora_up/.lora_down/.alpha, names as read
        assert set(f.keys()) == {f"{m}.{s}" for m in [*PEFT, *subject_only]
                                 for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert "base any: layers matched by the names written in the files: 4 in both, 1 only in the subject" in \
        capsys.readouterr().out


@pytest.mark.parametrize("method", ["direct", "np-lora"])
def test_kohya_and_comfy_spellings_of_one_layer_pair_up(tmp_path, method):
    subject = lora_file(tmp_path / "kohya.safetensors", NATIVE, fmt="kohya", rank=4, seed=3, alpha=2.0)
    style = lora_file(tmp_path / "comfy.safetensors", NATIVE, fmt="comfy", rank=2, seed=4, alpha=8.0)

    out = merge(tmp_path, subject, style, method, "--base", "any")

    as_kohya = {"lora_unet_" + stem.removeprefix("diffusion_model.").replace(".", "_"): update
                for stem, update in dense_layers(style).items()}
    assert_golden(method, out, dense_layers(subject), as_kohya)


def refused(tmp_path, subject, style, *extra):
    """stderr of a CLI merge that must fail: exit 2, one line, no traceback, no file written."""
    out = tmp_path / "never.safetensors"
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, *extra, weights_dir=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and not out.exists()
    return result.stderr


@pytest.mark.parametrize("base", [[], ["--base", "any"]], ids=["default", "any"])
def test_a_pair_sharing_no_layer_name_is_refused_naming_both_files(tmp_path, base):
    subject = lora_file(tmp_path / "fused.safetensors", NATIVE, fmt="kohya", rank=4, seed=1)
    style = lora_file(tmp_path / "split.safetensors", PEFT, fmt="peft", rank=4, seed=2)

    error = refused(tmp_path, subject, style, "--method", "direct", *base)

    assert "fused.safetensors and " in error and "split.safetensors share no layer name" in error
    assert "lora_unet_double_blocks_0_img_attn_proj" in error and "transformer.single_transformer_blocks.1" in error
    assert "matches layers by the name written in the file" in error and "ComfyUI node" in error


def test_one_name_with_two_shapes_is_refused_naming_the_layer_and_both_files(tmp_path):
    subject = lora_file(tmp_path / "flux.safetensors", PEFT, fmt="peft", rank=4, seed=1)
    other = {**PEFT, "transformer.transformer_blocks.0.attn.to_q": (32, 16)}
    style = lora_file(tmp_path / "other.safetensors", other, fmt="peft", rank=4, seed=2)

    error = refused(tmp_path, subject, style, "--method", "np-lora", "--base", "any")

    assert "transformer.transformer_blocks.0.attn.to_q" in error and "flux.safetensors has shape (24, 16)" in error
    assert "other.safetensors has (32, 16)" in error


@pytest.mark.parametrize("method,why", [("lorarar", "needs a hypernet trained for the LoRAs' model family"),
                                        ("b-lora", "published for SDXL only"),
                                        ("k-lora", "chooses per step at sampling time")])
def test_methods_that_need_a_layout_are_refused_with_base_any(tmp_path, method, why):
    subject = lora_file(tmp_path / "s.safetensors", PEFT, fmt="peft", rank=4, seed=1)
    style = lora_file(tmp_path / "t.safetensors", PEFT, fmt="peft", rank=4, seed=2)

    error = refused(tmp_path, subject, style, "--method", method, "--base", "any")

    assert why in error
    if method != "k-lora":
        assert "methods that can: direct, np-lora" in error


@pytest.mark.parametrize("method", ["lorarar", "b-lora"])
def test_a_dit_lora_given_to_a_method_that_needs_a_layout_is_named_as_such(tmp_path, method):
    subject = lora_file(tmp_path / "s.safetensors", PEFT, fmt="peft", rank=4, seed=1)
    style = lora_file(tmp_path / "t.safetensors", PEFT, fmt="peft", rank=4, seed=2)

    error = refused(tmp_path, subject, style, "--method", method)

    assert "s.safetensors: none of its layers is a sdxl layer (e.g. transformer.single_transformer_blocks.1" in error
    assert f"{method} needs the base model's layout; use --method direct or np-lora with --base any" in error


def test_lorarar_on_kohya_dit_names_is_refused_rather_than_summed_under_its_name(tmp_path, shared_weights):
    """kohya ``lora_unet_double_blocks_...`` names parse as SDXL names, but no layer is an attention projection the
    hypernet serves: the merge would be a plain sum labelled lorarar, so it is refused, saying so."""
    subject = lora_file(tmp_path / "s.safetensors", NATIVE, fmt="kohya", rank=4, seed=1)
    style = lora_file(tmp_path / "t.safetensors", NATIVE, fmt="kohya", rank=4, seed=2)

    out = tmp_path / "never.safetensors"
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, "--method", "lorarar",
                     weights_dir=shared_weights)
    error = result.stderr
    assert result.returncode == 2 and error.count("\n") == 1 and not out.exists(), result.stdout + error
    assert "s.safetensors + t.safetensors: lorarar merged no layer with the hypernet" in error
    assert "use method direct to sum them" in error
