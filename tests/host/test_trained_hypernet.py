"""A hypernet trained for SD 1.5 (``python -m hypernet train``, one step on devkit's synthetic dataset through the
synthetic SD 1.5 checkpoint) merges SD 1.5 LoRAs from the terminal (``python -m hypernet merge``, a real subprocess)
into exactly the factors the merge node gives for the same files on that model: both resolve the hypernet through
hypernet.checkpoints.resolve_hypernet, which reads the family and UNet layout the file records."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devkit import synthetic_models
from devkit.loras import random_lora, write_lora
from devkit.training_data import build_dataset, sd15_layout

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
SUBJECT, STYLE = "cli_sd15_subject.safetensors", "cli_sd15_style.safetensors"


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    return subprocess.run([sys.executable, "-m", "hypernet", *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def base():
    return synthetic_models.checkpoint_path(synthetic_models.ensure_sd15_model(), synthetic_models.SD15_CHECKPOINT)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """An SD 1.5 hypernet written by the training command (one step at 128 px: what matters is the file it writes)."""
    root = tmp_path_factory.mktemp("trained")
    data = build_dataset(root / "data", sd15_layout(), subjects=2, styles=2, images=1, image_size=128)
    out = root / "lorarar" / "sd15_trained.safetensors"
    out.parent.mkdir()
    proc = _cli("train", "--dataset", data, "--base", base, "--out", out, "--resolution", "128", "--epochs", "1",
                "--steps-per-pair", "1", "--validate-every", "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def loras(comfy_host):
    """Two SD 1.5 LoRAs in the host's loras folder: the subject in kohya SGM names, the style in kohya diffusers
    names (which only the model's own layout maps to the right blocks)."""
    _, _, folder = comfy_host
    layout = sd15_layout()
    subject = write_lora(folder / SUBJECT, random_lora(layout, rank=4, seed=301, alpha=4.0, std=0.05))
    style = write_lora(folder / STYLE, random_lora(layout, rank=8, seed=302, fmt="kohya-diffusers", std=0.05))
    return subject, style


def test_the_cli_merges_the_trained_familys_loras_exactly_as_the_node_does(comfy_host, base, trained, loras, tmp_path):
    import comfy.sd

    nodes, folder_paths, _ = comfy_host
    subject, style = loras
    out = tmp_path / "merged.safetensors"
    proc = _cli("merge", "--hypernet", trained, "--subject", subject, "--style", style, "--out", out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    attention = len(sd15_layout().attention_linears())
    assert f"hypernet {attention // 2}, summed {attention // 2}" in proc.stdout, proc.stdout

    folder_paths.add_model_folder_path("lorarar", str(trained.parent))
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=False, output_clip=False)
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load(trained.name, model)
    _, _, merged, report = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, hypernet, SUBJECT, STYLE, 1.0, 1.0, 1.0, 1.0, "lorarar", "sum")
    assert f"applied to the model: {attention} layers" in report, report

    from_node = merged.kohya_state_dict(torch.float32)
    from_cli = load_file(str(out))
    assert sorted(from_cli) == sorted(from_node) and len(from_cli) == 3 * attention  # up, down, alpha per layer
    for key, tensor in from_node.items():
        assert torch.equal(from_cli[key], tensor), key


def test_the_cli_refuses_another_family_for_a_trained_hypernet_in_one_line(trained, tmp_path):
    """--base names another model than the one the file says it was trained for: refused, as the node refuses it."""
    subject = write_lora(tmp_path / "sdxl_subject.safetensors", random_lora(rank=2, seed=1))
    style = write_lora(tmp_path / "sdxl_style.safetensors", random_lora(rank=2, seed=2))
    proc = _cli("merge", "--hypernet", trained, "--subject", subject, "--style", style, "--out", tmp_path / "x.safetensors",
                "--base", "sdxl")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()
    assert f"{trained}: this hypernet was trained for SD15 models; --base sdxl is another model" in proc.stderr
