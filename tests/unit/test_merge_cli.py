"""``python -m hypernet merge`` as a user runs it: real files, every outcome exit code 0 or exit 2 with one line.

- The command: the written kohya file, its report and metadata, --overwrite, a hypernet given by path (a real
  process each, as are one bad-input case per kind and the full disk: the entry point itself is proven there).
- Hostile input: exit 2, one line on stderr naming the file (and layer), no traceback, no output file written and
  no input touched. These run through the command's own entry function in this process (tests/support/cli.py),
  the same function ``python -m hypernet`` calls, on the pack imported the same single way.
- LoRAs of model families the SDXL parser does not know (``--base any``): the files are written here with
  Flux-style layer names in small shapes (no model needed): diffusers / PEFT names are kept as written, kohya
  ``lora_unet_`` and ComfyUI ``diffusion_model.`` spellings of one layer pair up, and each written layer equals the
  method's dense formula. tests/host/test_merge_cli.py does the same on the synthetic Flux and SD3.5 models and
  loads the output in ComfyUI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.dense_rule import dense_np_lora
from devkit.loras import random_lora, write_lora
from devkit.weights import hypernet_file
from hypernet.cli import main
from tests.support.cli import run_in_process
from tests.unit.test_methods_golden import relative_error

REPO = Path(__file__).resolve().parents[2]
MODULES = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_k",
           "output_blocks.0.1.transformer_blocks.3.attn2.to_out.0", "output_blocks.0.1.transformer_blocks.3.attn2.to_v"]


def run_cli(*args, weights_dir):
    env = dict(os.environ, LORARAR_WEIGHTS_DIR=str(weights_dir))
    return subprocess.run([sys.executable, "-m", "hypernet", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def run_cli_in_process(*args, weights_dir):
    """run_cli's command through the same entry function, in this process (tests/support/cli.py): for the cases that
    only check a refusal's one line, each a torch import shorter than a real process."""
    return run_in_process(*args, env={"LORARAR_WEIGHTS_DIR": str(weights_dir)})


@pytest.fixture
def pair(tmp_path):
    subject = write_lora(tmp_path / "dog.safetensors", random_lora(rank=4, seed=1, modules=MODULES, alpha=2.0))
    style = write_lora(tmp_path / "watercolor.safetensors", random_lora(rank=6, seed=2, modules=MODULES, fmt="reference"))
    return subject, style


def test_merge_writes_a_kohya_lora_and_prints_the_report(pair, tmp_path, shared_weights):
    subject, style = pair
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, "--json", weights_dir=shared_weights)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["layers"] == {"hypernet": 2, "summed": 2}
    with safe_open(str(out), framework="pt") as merged:
        keys = set(merged.keys())
        metadata = merged.metadata()
        up = merged.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight")
    assert len(keys) == 3 * len(MODULES) and up.shape == (640, 10)
    assert metadata["lorarar_subject"] == "dog.safetensors" and metadata["lorarar_method"] == "lorarar"
    assert len(metadata["lorarar_hypernet_sha256"]) == 64


def test_existing_output_is_kept_unless_overwrite(pair, tmp_path, shared_weights):
    subject, style = pair
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, weights_dir=shared_weights)
    assert result.returncode != 0 and out.read_bytes() == b"precious"
    assert result.stderr.strip().count("\n") == 0 and "mine.safetensors: file exists" in result.stderr
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, "--overwrite", "--method", "direct",
                     weights_dir=shared_weights)
    assert result.returncode == 0 and out.read_bytes() != b"precious"


@pytest.mark.parametrize("problem", ["missing", "truncated", "not_a_lora"])
def test_bad_input_gives_one_line_naming_the_file(problem, pair, tmp_path, shared_weights):
    subject, style = pair
    bad = tmp_path / f"{problem}.safetensors"
    if problem == "truncated":
        bad.write_bytes(subject.read_bytes()[:100])
    elif problem == "not_a_lora":
        bad.write_text("hello")
    result = run_cli("merge", "--subject", bad, "--style", style, "--out", tmp_path / "x.safetensors", weights_dir=shared_weights)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"{problem}.safetensors" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_hypernet_given_by_path_sets_the_base_model(tmp_path, shared_weights):
    """A KOALA checkpoint given as a path is recognised by its sha256, so diffusers names map with KOALA's layout."""
    from hypernet.base_models import KOALA_700M

    modules = ["input_blocks.5.1.transformer_blocks.4.attn1.to_q"]  # KOALA's 1280 block, named differently in SDXL
    subject = write_lora(tmp_path / "s.safetensors", random_lora(KOALA_700M, rank=2, seed=1, modules=modules, fmt="peft"))
    style = write_lora(tmp_path / "t.safetensors", random_lora(KOALA_700M, rank=2, seed=2, modules=modules))
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", tmp_path / "m.safetensors",
                     "--hypernet", shared_weights / hypernet_file("koala-700m"), "--json", weights_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout[: result.stdout.rindex("}") + 1])["layers"] == {"hypernet": 1}

# ------------------------------------------------------------------ hostile input: exit 2, one line

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _broken(tmp_path, case):
    """(subject, style, out, extra args, text stderr must hold) for one hostile case."""
    subject = write_lora(tmp_path / "subject.safetensors", random_lora(rank=4, seed=1, modules=MODULES))
    style = write_lora(tmp_path / "style.safetensors", random_lora(rank=4, seed=2, modules=MODULES))
    out = tmp_path / "out.safetensors"
    files = {
        "rank0": {f"{Q}.lora_up.weight": torch.zeros(640, 0), f"{Q}.lora_down.weight": torch.zeros(0, 640)},
        "rank0_alpha": {f"{Q}.lora_up.weight": torch.zeros(640, 0), f"{Q}.lora_down.weight": torch.zeros(0, 640),
                        f"{Q}.alpha": torch.tensor(4.0)},
        "alpha_vector": {f"{Q}.lora_up.weight": torch.ones(640, 4), f"{Q}.lora_down.weight": torch.ones(4, 640),
                         f"{Q}.alpha": torch.ones(4)},
        "int8": {f"{Q}.lora_up.weight": torch.ones(640, 4, dtype=torch.int8), f"{Q}.lora_down.weight": torch.ones(4, 640, dtype=torch.int8)},
        "huge_alpha": {f"{Q}.lora_up.weight": torch.ones(640, 4), f"{Q}.lora_down.weight": torch.full((4, 640), 10.0),
                       f"{Q}.alpha": torch.tensor(3e38)},
        "fp4_packed": {f"{Q}.lora_up.weight": torch.zeros(640, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
                       f"{Q}.lora_down.weight": torch.zeros(2, 640, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)},
    }
    if case in files:
        bad = _write(tmp_path / f"{case}.safetensors", files[case])
        expected = {"rank0": "empty factors", "rank0_alpha": "empty factors", "alpha_vector": "alpha must be one number",
                    "int8": "is int8", "huge_alpha": "overflows float32", "fp4_packed": "is float4_e2m1fn_x2"}[case]
        return subject, bad, out, [], [f"{case}.safetensors", "attn1_to_q", expected]
    if case == "odd_hypernet":
        hypernet = tmp_path / "odd_hypernet.pth"
        state = {"input_1.weight": torch.zeros(128, 1281), "input_1.bias": torch.zeros(128),
                 "output.1.weight": torch.zeros(2, 128), "output.1.bias": torch.zeros(2)}
        torch.save(state, hypernet)
        return subject, style, out, ["--hypernet", hypernet], ["odd_hypernet.pth", "1281"]
    if case in ("nan_strength", "inf_strength", "huge_strength"):
        value = {"nan_strength": "nan", "inf_strength": "-inf", "huge_strength": "1e30"}[case]
        return subject, style, out, [f"--style-strength={value}"], ["style strength", "between -10 and 10"]
    if case == "out_inside_a_file":
        return subject, style, subject / "merged.safetensors", [], ["subject.safetensors is a file, not a folder"]
    if case == "out_a_folder":
        return subject, style, tmp_path, [], ["is a folder"]
    if case == "out_is_the_subject":
        return subject, style, subject, ["--overwrite"], ["is the subject LoRA of this merge"]
    if case == "out_hard_link_to_style":
        os.link(style, tmp_path / "link.safetensors")
        return subject, style, tmp_path / "link.safetensors", ["--overwrite"], ["is the style LoRA of this merge"]
    if case == "out_newline":
        return subject, style, tmp_path / "bad\nname.safetensors", [], ["control character U+000A"]
    if case == "out_a_fifo":  # with --overwrite: a pipe (or, as root, /dev/null) is never replaced by a file
        os.mkfifo(tmp_path / "pipe.safetensors")
        return subject, style, tmp_path / "pipe.safetensors", ["--overwrite"], ["not a regular file"]
    if case == "out_too_long":
        return subject, style, tmp_path / ("x" * 250 + ".safetensors"), [], ["too long"]
    raise ValueError(case)


CASES = ["rank0", "rank0_alpha", "alpha_vector", "int8", "huge_alpha", "odd_hypernet", "nan_strength", "inf_strength",
         "huge_strength", "out_inside_a_file", "out_a_folder", "out_is_the_subject", "out_hard_link_to_style",
         "out_newline", "out_too_long", "fp4_packed", "out_a_fifo"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_merge_input_exits_2_with_one_line(tmp_path, shared_weights, case):
    subject, style, out, extra, expected = _broken(tmp_path, case)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = run_cli_in_process("merge", "--subject", subject, "--style", style, "--out", out, *extra,
                                weights_dir=shared_weights)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    for text in expected:
        assert text in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written, nothing replaced
    assert not list(tmp_path.glob(".*.tmp"))


def test_usage_mistakes_are_one_line_too(tmp_path, shared_weights):
    result = run_cli_in_process("merge", "--subject", "a.safetensors", "--style-strength", "-inf",
                                weights_dir=shared_weights)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "see python -m hypernet merge --help" in result.stderr


def test_help_offers_only_flags_a_terminal_run_can_use(shared_weights):
    """zip-lora needs reference images and prompts (the ZipLoRA node): --method zip-lora is refused in one line,
    and its parameters are no flags; every method that runs here keeps its own."""
    result = run_cli_in_process("merge", "--help", weights_dir=shared_weights)
    assert result.returncode == 0 and "--np-lora-mu" in result.stdout and "--k-lora-beta" in result.stdout
    assert "--zip-lora-" not in result.stdout
    refused = run_cli_in_process("merge", "--subject", "a.safetensors", "--style", "b.safetensors", "--out",
                                 "c.safetensors", "--method", "zip-lora", "--zip-lora-steps", "5", weights_dir=shared_weights)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr


def test_fp8_lora_merges_and_the_report_says_it_was_widened(tmp_path, shared_weights):
    subject = write_lora(tmp_path / "subject.safetensors", random_lora(rank=4, seed=1, modules=MODULES))
    style = write_lora(tmp_path / "fp8.safetensors", random_lora(rank=4, seed=2, modules=MODULES, dtype=torch.float8_e4m3fn))
    result = run_cli_in_process("merge", "--subject", subject, "--style", style, "--out", tmp_path / "m.safetensors",
                                weights_dir=shared_weights)
    assert result.returncode == 0, result.stderr
    assert "note: style LoRA: float8_e4m3fn factors of 4 layers widened to float32 (exact)" in result.stdout


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, shared_weights):
    """A write that fails half-way (here: a file-size limit, as a full disk fails) is one line, and no file stays."""
    import resource
    import signal
    import subprocess
    import sys

    subject = write_lora(tmp_path / "subject.safetensors", random_lora(rank=4, seed=1, modules=MODULES))
    style = write_lora(tmp_path / "style.safetensors", random_lora(rank=4, seed=2, modules=MODULES))
    out = tmp_path / "out.safetensors"

    def small_files():  # in the child: writes past 4 KB fail with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = dict(os.environ, LORARAR_WEIGHTS_DIR=str(shared_weights))
    result = subprocess.run([sys.executable, "-m", "hypernet", "merge", "--subject", str(subject), "--style", str(style),
                             "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            preexec_fn=small_files)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "out.safetensors: could not write the merged LoRA" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))

# ------------------------------------------------------------------ any model family (--base any)

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
    result = run_cli_in_process("merge", "--subject", subject, "--style", style, "--out", out, *extra,
                                weights_dir=tmp_path)
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
    result = run_cli_in_process("merge", "--subject", subject, "--style", style, "--out", out, "--method", "lorarar",
                                weights_dir=shared_weights)
    error = result.stderr
    assert result.returncode == 2 and error.count("\n") == 1 and not out.exists(), result.stdout + error
    assert "s.safetensors + t.safetensors: lorarar merged no layer with the hypernet" in error
    assert "use method direct to sum them" in error
