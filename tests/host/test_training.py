"""Training a LoRA.rar hypernetwork through ComfyUI's own model (hypernet/training + nodes/adapter/training.py), on the
synthetic SDXL-family checkpoint with a tiny synthetic dataset at 128 px (the smallest latent the UNet takes):
a few steps lower the loss on a fixed batch, a resumed run repeats an uninterrupted one step for step, torchrun
with 2 gloo ranks trains what one process with the same effective batch trains, and Ctrl-C keeps a usable
checkpoint. A training step costs several seconds on 2 CPU cores, so each test runs 1 to 4 of them.

``python -m hypernet train`` against hostile flags, through the real ComfyUI adapter (on the synthetic SD 1.5):
errors raised inside the pack (imported as its own package there) come out as one ``error:`` line, not a
traceback; --overwrite never replaces the run's own inputs; --resume without a checkpoint and a non-finite --init
are refused before the dataset is encoded."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from devkit import synthetic_models
from devkit.training_data import build_dataset

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 128


class Pack:
    """The pack's training modules as the server loaded them."""

    def __init__(self, root: str):
        for name in ("nodes.adapter.training", "hypernet.training.trainer", "hypernet.training.recipe",
                     "hypernet.training.output", "hypernet.training.dataset", "hypernet.training.state", "hypernet.model"):
            setattr(self, name.rsplit(".", 1)[1], importlib.import_module(f"{root}.{name}"))


@pytest.fixture(scope="module")
def pack(comfy_host):
    nodes, _, _ = comfy_host
    module = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].__module__
    return Pack(module.rsplit(".nodes.merge", 1)[0])


def make_dataset(root, images: int = 2):
    """devkit's synthetic dataset (2 x 2 training pairs, 1 x 1 held out) shaped for the synthetic KOALA-class model."""
    from devkit.training_data import build_dataset
    from hypernet.base_models import UNetLayout

    layout = UNetLayout.from_unet_config("synthetic", dict(synthetic_models.UNET_CONFIG))
    return build_dataset(root, layout, images=images, image_size=136, rank=4, std=0.1)


@pytest.fixture(scope="module")
def base():
    return synthetic_models.checkpoint_path(synthetic_models.ensure_models())


@pytest.fixture(scope="module")
def dataset(pack, tmp_path_factory):
    return pack.dataset.load_dataset(make_dataset(tmp_path_factory.mktemp("training") / "data"))


@pytest.fixture(scope="module")
def encodings(pack, comfy_host, synthetic_model, base, dataset, tmp_path_factory):
    """The dataset encoded by the checkpoint's own VAE and CLIP, also written where the CLI looks (--cache-dir)."""
    import comfy.sd

    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=True, output_clip=False)
    _, clip = synthetic_model
    recipe = pack.recipe.Recipe(resolution=RESOLUTION)
    entries = pack.training.encode_entries(clip, vae, dataset, recipe)
    cache = tmp_path_factory.mktemp("encodings")
    pack.training.write_encodings(cache / f"encodings-{pack.training.cache_key(base, dataset, recipe)}.pt", entries)
    return entries, cache


@pytest.fixture(scope="module")
def task(pack, synthetic_model, dataset, encodings):
    model, _ = synthetic_model
    model.model.requires_grad_(False)
    task = pack.training.ComfyTask(model, dataset, encodings[0], pack.recipe.Recipe(resolution=RESOLUTION))
    with pack.training.loaded(task.patched):
        yield task


def _recipe(pack, **changes):
    return pack.recipe.Recipe(resolution=RESOLUTION, steps_per_pair=1, **changes)


def _trainer(pack, task, dataset, run_dir, recipe, **options):
    widths = pack.training.attention_widths(task.model)
    net = pack.model.new_hypernet(widths, hidden=recipe.hidden, seed=recipe.seed)
    options = {"checkpoint_every": 1, "validate_every": 0, **options}
    return pack.trainer.Trainer(net, task, dataset.pairs("train"), dataset.pairs("validation"), recipe, run_dir,
                                **options)


def _steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "step"]


def test_widths_are_the_models_attention_widths(pack, task):
    assert pack.training.attention_widths(task.model) == [640, 1280]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(pack, task, dataset, tmp_path):
    trainer = _trainer(pack, task, dataset, tmp_path, _recipe(pack, epochs=2), train_eval_pairs=1)
    before = trainer.evaluate(trainer.train_eval_pairs)
    result = trainer.run()
    after = trainer.evaluate(trainer.train_eval_pairs)
    assert result.steps == 2 and not result.stopped
    assert after["total"] < before["total"], (before, after)
    steps = _steps(tmp_path)
    assert [s["step"] for s in steps] == [1, 2] and all(s["grad_norm"] > 0 for s in steps)
    assert set(steps[0]) >= {"total", "subject", "style", "similarity", "pairs", "lr", "epoch"}
    print(f"seconds per training step (synthetic KOALA-class UNet, {RESOLUTION} px, CPU): {result.seconds_per_step:.2f}")


def test_resume_repeats_an_uninterrupted_run_step_for_step(pack, task, dataset, tmp_path):
    whole = _trainer(pack, task, dataset, tmp_path / "whole", _recipe(pack, epochs=2))
    whole_result = whole.run()
    first = _trainer(pack, task, dataset, tmp_path / "split", _recipe(pack, epochs=1))
    first.run()
    torch.manual_seed(12345)  # the global RNG state must come back from the checkpoint, not from here
    second = _trainer(pack, task, dataset, tmp_path / "split", _recipe(pack, epochs=2))
    second.resume()
    assert second.step == 1
    resumed = second.run()
    assert resumed.steps == 2
    keys = ("total", "subject", "style", "similarity", "grad_norm", "pairs")
    assert [{k: s[k] for k in keys} for s in _steps(tmp_path / "split")] == [{k: s[k] for k in keys} for s in _steps(tmp_path / "whole")]
    for key, value in whole_result.hypernet.state_dict().items():
        assert torch.equal(value, resumed.hypernet.state_dict()[key]), key
    other = _trainer(pack, task, dataset, tmp_path / "split", _recipe(pack, epochs=2, learning_rate=0.02))
    with pytest.raises(Exception, match="learning_rate was 0.01, now 0.02"):
        other.resume()


def _cli(*args, cache: Path) -> list[str]:
    return ["-m", "hypernet", "train", *args, "--resolution", str(RESOLUTION), "--steps-per-pair", "1",
            "--cache-dir", str(cache), "--validate-every", "0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "LORARAR_COMFY": str(synthetic_models.comfy_root())}


def test_torchrun_two_gloo_ranks_train_what_one_process_with_the_same_batch_trains(pack, task, dataset, base, encodings, tmp_path):
    out = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_cli("--dataset", str(dataset.root), "--base", str(base), "--out", str(out), "--epochs", "2",
                     cache=encodings[1])]
    started = time.perf_counter()
    proc = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp_seconds = time.perf_counter() - started
    one = _trainer(pack, task, dataset, tmp_path / "one", _recipe(pack, epochs=2, batch_pairs=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): the same summation order in every kernel
    try:
        result = one.run()
    finally:
        torch.set_num_threads(threads)
    ddp_steps, one_steps = _steps(out.parent / (out.name + ".training")), _steps(tmp_path / "one")
    assert [s["pairs"] for s in ddp_steps] == [s["pairs"] for s in one_steps] and len(one_steps[0]["pairs"]) == 2
    for ddp, single in zip(ddp_steps, one_steps):
        for key in ("total", "subject", "style", "similarity", "grad_norm"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4), (key, ddp, single)
    trained = load_file(str(out))
    for key, value in result.hypernet.state_dict().items():
        assert torch.allclose(trained[key], value, rtol=1e-4, atol=1e-6), key
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["lorarar_widths"] == "640,1280" and metadata["lorarar_steps"] == "2"
    assert metadata["lorarar_model_classes"] == synthetic_models.EXPECTED_MODEL_CLASS
    assert json.loads(metadata["lorarar_recipe"])["effective_batch_pairs"] == 2
    assert len(json.loads(metadata["lorarar_pairs"])) == 4 and metadata["lorarar_base_model"] == base.name
    print(f"torchrun 2 ranks, 2 steps, with model loading: {ddp_seconds:.0f} s")


def test_ctrl_c_leaves_a_checkpoint_that_resumes(pack, task, dataset, base, encodings, tmp_path):
    out = tmp_path / "stopped.safetensors"
    run_dir = out.parent / (out.name + ".training")
    proc = subprocess.Popen([sys.executable, *_cli("--dataset", str(dataset.root), "--base", str(base), "--out", str(out),
                                                   "--epochs", "5", "--checkpoint-every", "0", cache=encodings[1])],
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not ((run_dir / "log.jsonl").is_file() and _steps(run_dir)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, output[-3000:]
    assert "continues with --resume" in output and not out.exists()
    state = pack.state.load_checkpoint(run_dir)
    assert 1 <= state.step < 5 and len(_steps(run_dir)) == state.step
    pack.model.LoraRarHypernet.from_state_dict(state.hypernet)  # a complete network
    resumed = _trainer(pack, task, dataset, run_dir, _recipe(pack, epochs=state.step + 1))
    resumed.resume()
    assert resumed.run().steps == state.step + 1 and len(_steps(run_dir)) == state.step + 1


def test_check_dataset_against_the_base_names_a_lora_made_for_another_model(pack, base, tmp_path):
    from devkit.loras import SD15, random_lora, write_lora

    data = make_dataset(tmp_path / "data", images=1)
    assert pack.training.check_against_model(data, base) == []
    write_lora(data / "styles" / "style_2" / "lora.safetensors", random_lora(SD15, rank=2, seed=4))
    problems = pack.training.check_against_model(data, base)
    assert len(problems) == 1 and str(data / "styles" / "style_2" / "lora.safetensors") in problems[0], problems


# --- the training command against hostile flags

@pytest.fixture(scope="module")
def sd15_base():
    """The synthetic SD 1.5 checkpoint (base above is the SDXL-family one)."""
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


def test_resume_without_a_checkpoint_is_one_line_before_encoding(sd15_base, data, tmp_path):
    out = tmp_path / "net.safetensors"
    proc = _train("--dataset", data, "--base", sd15_base, "--out", out, "--resume")
    _one_error_line(proc, "state.pt: no training checkpoint to resume from")
    assert not list((tmp_path).glob("net.safetensors.training/encodings-*.pt"))  # refused before encoding


def test_overwrite_never_replaces_a_lora_of_the_dataset_or_the_base(sd15_base, data, tmp_path):
    lora = data / "subjects" / "subject_0" / "lora.safetensors"
    before = lora.read_bytes()
    proc = _train("--dataset", data, "--base", sd15_base, "--out", lora, "--overwrite")
    _one_error_line(proc, f"{lora}: is the subject LoRA subject_0")
    assert lora.read_bytes() == before
    link = tmp_path / "base_link.safetensors"
    link.symlink_to(sd15_base)
    _one_error_line(_train("--dataset", data, "--base", sd15_base, "--out", link, "--overwrite"),
                    "is the base checkpoint")
    assert link.is_symlink()


def test_a_nan_init_is_refused_before_encoding(sd15_base, data, tmp_path):
    from hypernet.model import new_hypernet

    init = tmp_path / "nan.safetensors"
    save_file({k: v * float("nan") for k, v in new_hypernet([320, 640, 1280], hidden=8).state_dict().items()}, str(init))
    proc = _train("--dataset", data, "--base", sd15_base, "--out", tmp_path / "net.safetensors", "--init", init)
    _one_error_line(proc, "holds NaN or Inf values")
    assert not list(tmp_path.glob("net.safetensors.training/encodings-*.pt"))


def test_a_validation_lora_for_another_model_is_refused_before_the_first_step(sd15_base, data, tmp_path):
    from devkit.loras import SDXL, random_lora, write_lora

    lora = data / "styles" / "style_1" / "lora.safetensors"  # held out: never drawn with --validate-every 0
    write_lora(lora, random_lora(SDXL, rank=2, seed=4))
    out = tmp_path / "net.safetensors"
    proc = _train("--dataset", data, "--base", sd15_base, "--out", out)
    _one_error_line(proc, f"{lora}: layer ")
    assert "a LoRA for another base model?" in proc.stderr and not out.exists()
    assert not (tmp_path / "net.safetensors.training" / "log.jsonl").exists()  # no step ran


@pytest.fixture(scope="module")
def training(comfy_host):
    import importlib

    nodes, _, _ = comfy_host
    root = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].__module__.rsplit(".nodes.merge", 1)[0]
    return importlib.import_module(f"{root}.nodes.adapter.training")


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
    """python -m hypernet runs inside the pack imported once: nodes/adapter/training.py raises the very LoraRarError class the
    command line catches, and no second copy of hypernet/ (with a second error class) exists in the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORARAR_COMFY": str(synthetic_models.comfy_root())}
    proc = subprocess.run([sys.executable, "-c", ONE_PACK, str(tmp_path / "encodings.pt")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caught by the CLI: True" in proc.stdout and "LoraRarError classes: 1" in proc.stdout, proc.stdout


def test_check_dataset_against_the_base_lists_each_problem_of_a_broken_lora_once(sd15_base, data):
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
    proc = subprocess.run([sys.executable, "-m", "hypernet", "check-dataset", str(data), "--base", str(sd15_base)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{nan}: ") and lines[1].startswith(f"{unreadable}: "), lines
    assert "NaN" in lines[0] and f"{data}: 2 problem(s)" in proc.stderr, proc.stdout + proc.stderr
