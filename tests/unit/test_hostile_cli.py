"""``python -m hypernet merge`` on hostile input, as a real process: exit 2, one line on stderr naming the file
(and layer), no traceback, no output file written and no input touched."""

import os

import pytest
import torch
from safetensors.torch import save_file

from devkit.loras import random_lora, write_lora
from tests.unit.test_cli import MODULES, run_cli

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
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", out, *extra, weights_dir=shared_weights)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    for text in expected:
        assert text in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written, nothing replaced
    assert not list(tmp_path.glob(".*.tmp"))


def test_usage_mistakes_are_one_line_too(tmp_path, shared_weights):
    result = run_cli("merge", "--subject", "a.safetensors", "--style-strength", "-inf", weights_dir=shared_weights)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "see python -m hypernet merge --help" in result.stderr


def test_fp8_lora_merges_and_the_report_says_it_was_widened(tmp_path, shared_weights):
    subject = write_lora(tmp_path / "subject.safetensors", random_lora(rank=4, seed=1, modules=MODULES))
    style = write_lora(tmp_path / "fp8.safetensors", random_lora(rank=4, seed=2, modules=MODULES, dtype=torch.float8_e4m3fn))
    result = run_cli("merge", "--subject", subject, "--style", style, "--out", tmp_path / "m.safetensors", weights_dir=shared_weights)
    assert result.returncode == 0, result.stderr
    assert "note: style LoRA: float8_e4m3fn factors of 4 layers widened to float32 (exact)" in result.stdout


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, shared_weights):
    """A write that fails half-way (here: a file-size limit, as a full disk fails) is one line, and no file stays."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.unit.test_cli import REPO

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
