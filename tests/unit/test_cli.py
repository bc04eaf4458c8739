"""``python -m hypernet merge`` as a user runs it: a real process, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from devkit.loras import random_lora, write_lora
from devkit.weights import hypernet_file

REPO = Path(__file__).resolve().parents[2]
MODULES = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_k",
           "output_blocks.0.1.transformer_blocks.3.attn2.to_out.0", "output_blocks.0.1.transformer_blocks.3.attn2.to_v"]


def run_cli(*args, weights_dir):
    env = dict(os.environ, LORARAR_WEIGHTS_DIR=str(weights_dir))
    return subprocess.run([sys.executable, "-m", "hypernet", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


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
