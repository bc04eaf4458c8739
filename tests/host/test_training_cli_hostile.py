"""``python -m hypernet train`` against hostile flags, through the real ComfyUI adapter: errors raised inside the
pack (imported as its own package there) come out as one ``error:`` line, not a traceback; --overwrite never
replaces the run's own inputs; --resume without a checkpoint and a non-finite --init are refused before the
dataset is encoded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from devkit import synthetic_models
from devkit.training_data import build_dataset

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base():
    return synthetic_models.checkpoint_path(synthetic_models.ensure_sd15_model(), synthetic_models.SD15_CHECKPOINT)


@pytest.fixture
def data(tmp_path):
    return build_dataset(tmp_path / "data", subjects=2, styles=2, images=1, image_size=136)


def _train(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    command = [sys.executable, "-m", "hypernet", "train", *map(str, args), "--resolution", "128", "--epochs", "1",
               "--steps-per-pair", "1", "--validate-every", "0"]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]


def test_resume_without_a_checkpoint_is_one_line_before_encoding(base, data, tmp_path):
    out = tmp_path / "net.safetensors"
    proc = _train("--dataset", data, "--base", base, "--out", out, "--resume")
    _one_error_line(proc, "state.pt: no training checkpoint to resume from")
    assert not list((tmp_path).glob("net.safetensors.training/encodings-*.pt"))  # refused before encoding


def test_overwrite_never_replaces_a_lora_of_the_dataset_or_the_base(base, data, tmp_path):
    lora = data / "subjects" / "subject_0" / "lora.safetensors"
    before = lora.read_bytes()
    proc = _train("--dataset", data, "--base", base, "--out", lora, "--overwrite")
    _one_error_line(proc, f"{lora}: is the subject LoRA subject_0")
    assert lora.read_bytes() == before
    link = tmp_path / "base_link.safetensors"
    link.symlink_to(base)
    _one_error_line(_train("--dataset", data, "--base", base, "--out", link, "--overwrite"), "is the base checkpoint")
    assert link.is_symlink()


def test_a_nan_init_is_refused_before_encoding(base, data, tmp_path):
    from hypernet.model import new_hypernet

    init = tmp_path / "nan.safetensors"
    save_file({k: v * float("nan") for k, v in new_hypernet([320, 640, 1280], hidden=8).state_dict().items()}, str(init))
    proc = _train("--dataset", data, "--base", base, "--out", tmp_path / "net.safetensors", "--init", init)
    _one_error_line(proc, "holds NaN or Inf values")
    assert not list(tmp_path.glob("net.safetensors.training/encodings-*.pt"))


def test_a_validation_lora_for_another_model_is_refused_before_the_first_step(base, data, tmp_path):
    from devkit.loras import SDXL, random_lora, write_lora

    lora = data / "styles" / "style_1" / "lora.safetensors"  # held out: never drawn with --validate-every 0
    write_lora(lora, random_lora(SDXL, rank=2, seed=4))
    out = tmp_path / "net.safetensors"
    proc = _train("--dataset", data, "--base", base, "--out", out)
    _one_error_line(proc, f"{lora}: layer ")
    assert "a LoRA for another base model?" in proc.stderr and not out.exists()
    assert not (tmp_path / "net.safetensors.training" / "log.jsonl").exists()  # no step ran


@pytest.fixture(scope="module")
def training(comfy_host):
    import importlib

    nodes, _, _ = comfy_host
    root = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].__module__.rsplit(".nodes.merge", 1)[0]
    return importlib.import_module(f"{root}.nodes.training")


def test_a_truncated_or_code_running_encodings_cache_is_one_line(training, tmp_path):
    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil, truncated = tmp_path / "encodings-evil.pt", tmp_path / "encodings-cut.pt"
    torch.save({"format": 1, "entries": Payload()}, evil)
    torch.save({"format": 1, "entries": {"a": torch.zeros(10000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    for path in (evil, truncated):
        with pytest.raises(Exception, match="unreadable encoded-dataset cache") as raised:
            training.read_encodings(path)
        assert type(raised.value).__name__ == "LoraRarError" and str(raised.value).startswith(str(path))
        assert "delete it to encode again" in str(raised.value) and "\n" not in str(raised.value)
        assert "weights_only` set to `False`" not in str(raised.value)
    assert not marker.exists()


# What ``python -m hypernet`` does (hypernet/__main__.py), stopped before main() to look at the error classes.
ONE_PACK = """
import importlib, sys
from pathlib import Path
from hypernet.__main__ import import_pack

root = import_pack().__name__
cli = importlib.import_module(root + ".hypernet.cli")
adapter = importlib.import_module(root + ".hypernet.training.command").comfy_adapter(None)
bad = Path(sys.argv[1])
bad.write_bytes(b"not a torch file")
try:
    adapter.read_encodings(bad)
except Exception as error:
    print("caught by the CLI:", isinstance(error, cli.LoraRarError))
print("LoraRarError classes:", sorted({id(getattr(m, "LoraRarError")) for name, m in list(sys.modules.items())
                                      if name.endswith("hypernet.errors")}).__len__())
"""


def test_the_training_cli_imports_the_pack_once_so_the_adapters_errors_are_the_clis(tmp_path):
    """python -m hypernet runs inside the pack imported once: nodes/training.py raises the very LoraRarError class the
    command line catches, and no second copy of hypernet/ (with a second error class) exists in the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    proc = subprocess.run([sys.executable, "-c", ONE_PACK, str(tmp_path / "encodings.pt")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caught by the CLI: True" in proc.stdout and "LoraRarError classes: 1" in proc.stdout, proc.stdout


def test_check_dataset_against_the_base_lists_each_problem_of_a_broken_lora_once(base, data):
    """check-dataset --base reads each LoRA once (through the model's key map): a NaN LoRA and an unreadable one are
    each one line, not one from the file check and another from the model check."""
    from safetensors.torch import load_file

    nan = data / "subjects" / "subject_0" / "lora.safetensors"
    state = load_file(str(nan))
    first = sorted(state)[0]
    save_file({**state, first: state[first] * float("nan")}, str(nan))
    unreadable = data / "styles" / "style_1" / "lora.safetensors"
    unreadable.write_bytes(b"not a safetensors file")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    proc = subprocess.run([sys.executable, "-m", "hypernet", "check-dataset", str(data), "--base", str(base)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{nan}: ") and lines[1].startswith(f"{unreadable}: "), lines
    assert "NaN" in lines[0] and f"{data}: 2 problem(s)" in proc.stderr, proc.stdout + proc.stderr
