"""The pack's GPU path, checked in one command (under 8 minutes on one GPU); on a machine without one it says so.

    python scripts/gpu_check.py                       # on a CUDA machine: every check, a table at the end
    python scripts/gpu_check.py --simulate-on-cpu     # the same code with the CPU standing in (the suite runs this)

Checks, each PASS / FAIL / SKIP with its numbers:
1. golden: LoRA.rar merge of two random rank-64 SDXL attention LoRAs (560 layers) with the published SDXL
   hypernet on the GPU (same-shape layers batched through H) against the CPU result (per-layer loop);
2. merge time on the GPU against two stock LoraLoaders patching the same LoRAs (ratio, same run);
3. one sampling step of the synthetic SDXL-family model with the merged patch under the host's default
   GPU settings (0.33: dynamic VRAM) and under --lowvram, each against the same patch on the CPU
   (separate processes, since ComfyUI's memory mode is fixed per process);
4. ComfyUI's LoRA arithmetic in float16 (lora_compute_dtype on fp16-capable GPUs) on the merged layers with
   strengths that stretch LoRA.rar's unbounded coefficients: no Inf/NaN, close to float32;
5. the ZipLoRA node as the server runs it (inference mode around it), three steps on the synthetic model in
   the device's default mode: finite losses that fall on the fixed batch, seconds per optimisation step and
   peak device memory, beside one sampling step of the same model;
6. training a hypernetwork (python -m hypernet train's loop): on a GPU the SDXL-architecture UNet at 1024 px,
   rank-64 LoRAs, fp16 autocast, with and without gradient checkpointing: seconds per step, peak memory, and the
   same first-step gradient norm both ways (with the CPU standing in: the synthetic model at 64 px, rank 4).

The GPU machines lent to this project reach no package registry: scripts/gpu_bundle.sh packs what the check
needs (ComfyUI at the pinned commit, the published hypernets, missing wheels) into .gpu/ to carry along.
Synthetic models are built on the machine. Exit status: 0 when no check FAILs (or no GPU is present).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit.loaded_pack import pack_module  # noqa: E402  (needs the repo on sys.path)
CARRIED_SITE = REPO / ".gpu" / "site"  # what scripts/gpu_bundle.sh --install put there (workers inherit it)
if CARRIED_SITE.is_dir():
    sys.path.insert(0, str(CARRIED_SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CARRIED_SITE), os.environ.get("PYTHONPATH")]))

GOLDEN_TOLERANCE = 1e-4  # float32 on both sides, TF32 off: only summation order differs
SAMPLE_TOLERANCE = 5e-2  # fp16/bf16 GPU model against a float32 CPU model, one step, relative to the output's scale
FP16_TOLERANCE = 2e-2  # float16 LoRA arithmetic against float32, relative to the patched weight's scale


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def weights_dir(given: str | None) -> Path:
    from devkit.weights import hypernet_file, shared_weights_dir
    from hypernet.checkpoints import WEIGHTS_DIR

    for candidate in (given, shared_weights_dir(), REPO / ".gpu" / "weights", WEIGHTS_DIR):
        if candidate and (Path(candidate) / hypernet_file("sdxl")).is_file():
            return Path(candidate)
    raise SystemExit(f"gpu_check: no {hypernet_file('sdxl')} found (--weights DIR, or run scripts/gpu_bundle.sh)")


# ------------------------------------------------------------------ 1. golden merge

def random_sdxl_lora(rank: int, seed: int, path: Path):
    from devkit.loras import random_lora
    from hypernet.base_models import SDXL
    from hypernet.lora_io import lora_from_tensors

    return lora_from_tensors(random_lora(SDXL, rank=rank, seed=seed), path)


def check_golden(device: str, weights: Path) -> dict:
    import torch

    from devkit.weights import shared_hypernet
    from hypernet.merge import merge_loras
    from hypernet.model import LoraRarHypernet

    torch.backends.cuda.matmul.allow_tf32 = False
    hypernet = LoraRarHypernet.load(shared_hypernet("sdxl", weights))
    subject, style = random_sdxl_lora(64, 1, Path("subject")), random_sdxl_lora(64, 2, Path("style"))
    # the CPU's branch (layer by layer) against the accelerator's (same-shape layers through H together)
    reference = merge_loras(subject, style, hypernet.to("cpu"), dtype=torch.float32, device="cpu", batched=False)
    on_device = merge_loras(subject, style, hypernet.to(device), dtype=torch.float32, device=device, batched=True)
    worst = 0.0
    for name, layer in reference.layers.items():
        other = on_device.layers[name]
        for ours, ref in ((other.down, layer.down), (other.up, layer.up)):
            worst = max(worst, float((ours.float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return {"check": "golden merge on the device vs CPU", "layers": len(reference.layers),
            "max_relative_error": worst, "ok": worst <= GOLDEN_TOLERANCE}


# ------------------------------------------------------------------ 2-4 need ComfyUI: each in its own process

def run_worker(task: str, args: argparse.Namespace, extra: list[str], timeout: float = 300) -> dict:
    """Run ``task`` in a fresh python (ComfyUI's memory mode is set once per process); its last line is JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--weights", str(args.weights),
               "--work", str(args.work), *(["--comfy", args.comfy] if args.comfy else []), *extra]
    process = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    missing = re.search(r"No module named '([^']+)'", process.stderr)
    if process.returncode != 0 and missing:  # a dependency that did not fit in .gpu/ (scripts/gpu_bundle.sh)
        return {"skip": f"module {missing.group(1)} is not installed on this machine"}
    if process.returncode != 0 or not lines:
        tail = " | ".join((process.stderr or process.stdout).strip().splitlines()[-6:])
        return {"error": f"{task} exited {process.returncode}: {tail}"}
    return json.loads(lines[-1][len("RESULT "):])


_NODES = []  # ComfyUI's nodes module once imported: the CPU's stand-in runs every worker in one process


def comfy_in_process(comfy: str | None, work: Path, weights: Path, mode: str):
    """Import ComfyUI with the pack loaded; mode 'cpu', 'default' or 'lowvram'. Returns the nodes module."""
    if _NODES:
        return _NODES[0]
    from devkit.synthetic_models import comfy_root

    root = Path(comfy) if comfy else comfy_root()
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = mode == "cpu"
    comfy.cli_args.args.lowvram = mode == "lowvram"
    import utils.extra_config  # noqa: F401  (before nodes, as main.py does)
    import folder_paths
    import nodes

    from devkit.comfy_server import load_pack_in_process

    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    folder_paths.add_model_folder_path("lorarar", str(weights))
    # this checkout's pack, whether the host links none, this checkout or another one (a git worktree's run)
    load_pack_in_process(nodes, folder_paths, comfy.cli_args.args, root, work / "custom_nodes")
    if "LoraRarMerge" not in nodes.NODE_CLASS_MAPPINGS:
        raise SystemExit("the pack did not load into ComfyUI")
    _NODES.append(nodes)
    return nodes


def _write_loras(work: Path, layout, rank: int) -> tuple[str, str]:
    from devkit.loras import random_lora, write_lora

    names = ("gpu_subject.safetensors", "gpu_style.safetensors")
    for name, seed in zip(names, (1, 2)):
        if not (work / "loras" / name).is_file():
            write_lora(work / "loras" / name, random_lora(layout, rank=rank, seed=seed, std=0.05))
    return names


def _merge(nodes, model, names, strength: float = 1.0):
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto")
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, hypernet, names[0], names[1], strength, strength, 1.0, 1.0, "lorarar", "sum")


def _synthetic_model():
    import comfy.sd
    from devkit.synthetic_models import checkpoint_path, ensure_models

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(checkpoint_path(ensure_models(in_process=True))), output_vae=False, output_clip=False)
    return model


def worker_speed(args) -> dict:
    """Merge node (files to weights on the device) vs two stock LoraLoaders: SDXL-architecture UNet with rank-64
    LoRAs on a GPU; the synthetic model with rank-8 LoRAs when the CPU stands in."""
    nodes = comfy_in_process(args.comfy, args.work, args.weights, args.mode)

    import torch

    import comfy.model_management
    from devkit.synthetic_models import sdxl_unet_patcher
    from hypernet.base_models import UNetLayout

    model = sdxl_unet_patcher() if args.mode != "cpu" else _synthetic_model()
    layout = UNetLayout.from_unet_config("speed", model.model.model_config.unet_config)
    names = _write_loras(args.work, layout, 64 if args.mode != "cpu" else 8)
    device = comfy.model_management.get_torch_device()

    def stock():
        patched = model
        for name in names:
            patched, _ = nodes.LoraLoader().load_lora(patched, None, name, 1.0, 1.0)
        return patched

    def ours():
        return _merge(nodes, model, names)[0]

    times = {}
    for label, function in (("stock", stock), ("ours", ours)) * 4:
        pack_module(nodes, "nodes.adapter").forget_results()  # cold merge each time; the files stay in the page cache
        nodes.LoraLoader.loaded_lora = None
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        patched = function()
        patched.patch_model(device_to=device)  # every patched weight computed on the device
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.setdefault(label, []).append(time.perf_counter() - start)
        patched.unpatch_model(device_to=comfy.model_management.unet_offload_device())
    # the first of each is a warm-up (imports, hypernet load, kernels)
    ours_s, stock_s = statistics.median(times["ours"][1:]), statistics.median(times["stock"][1:])
    return {"check": "merge node vs two stock LoraLoaders (files to patched weights)", "device": str(device),
            "model": type(model.model.model_config).__name__, "layers": len(layout.attention_linears()),
            "ours_s": ours_s, "stock_s": stock_s, "ratio": ours_s / stock_s, "ok": True}


def worker_sample(args) -> dict:
    """One Euler step of the synthetic model with the merged patch; the output latent goes to a file."""
    nodes = comfy_in_process(args.comfy, args.work, args.weights, args.mode)

    import torch

    import comfy.model_management
    from devkit.synthetic_models import UNET_CONFIG
    from hypernet.base_models import UNetLayout

    model = _synthetic_model()
    names = _write_loras(args.work, UNetLayout.from_unet_config("synthetic", UNET_CONFIG), 16)
    patched = _merge(nodes, model, names)[0]
    generator = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    uncond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    latent = {"samples": torch.zeros(1, 4, args.latent, args.latent)}
    (out,) = nodes.common_ksampler(patched, 0, 1, 5.0, "euler", "normal", cond, uncond, latent, denoise=1.0)
    path = args.work / f"sample_{args.mode}.pt"
    torch.save(out["samples"].float().cpu(), path)
    return {"patcher": type(patched).__name__, "device": str(comfy.model_management.get_torch_device()),
            "dtype": str(patched.model.get_dtype()), "path": str(path)}


def worker_fp16(args) -> dict:
    """ComfyUI's LoRA arithmetic with float16 intermediates on the merged layers, strengths up to 10."""
    nodes = comfy_in_process(args.comfy, args.work, args.weights, args.mode)

    import torch

    import comfy.lora
    import comfy.model_management
    from devkit.synthetic_models import UNET_CONFIG
    from hypernet.base_models import UNetLayout

    model = _synthetic_model()
    names = _write_loras(args.work, UNetLayout.from_unet_config("synthetic", UNET_CONFIG), 16)
    device = comfy.model_management.get_torch_device()
    compute = getattr(comfy.model_management, "lora_compute_dtype", lambda d: torch.float32)(device)
    worst, finite, layers = 0.0, True, 0
    for strength in (1.0, 10.0):
        patched = _merge(nodes, model, names, strength)[0]
        state = patched.model.state_dict()
        for key, patches in patched.patches.items():
            weight = state[key].to(device)
            half = comfy.lora.calculate_weight(patches, weight.to(torch.float16), key, intermediate_dtype=torch.float16)
            full = comfy.lora.calculate_weight(patches, weight.float(), key, intermediate_dtype=torch.float32)
            finite &= bool(torch.isfinite(half).all())
            worst = max(worst, float((half.float() - full).abs().max() / full.abs().max().clamp_min(1e-30)))
            layers += 1
    return {"check": "float16 LoRA arithmetic on merged layers (strength 1 and 10)", "device": str(device),
            "host_lora_compute_dtype": str(compute), "layers": layers, "finite": finite,
            "max_relative_error": worst, "ok": finite and worst <= FP16_TOLERANCE}


def _loss_totals(report: str) -> list[float]:
    """The ZipLoRA report's total loss at start and at end (one fixed evaluation batch)."""
    return [float(line.split("total ")[1].split(" ")[0]) for line in report.splitlines()
            if line.startswith("loss on a fixed evaluation batch")]


def worker_ziplora(args) -> dict:
    """The ZipLoRA node as the server runs it (under torch.inference_mode), a few steps on the synthetic model in
    the device's default mode: finite losses that fall on the fixed batch, seconds per optimisation step and
    peak device memory, against one sampling step of the same model."""
    nodes = comfy_in_process(args.comfy, args.work, args.weights, args.mode)

    import torch

    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import comfy.utils
    from devkit.synthetic_models import UNET_CONFIG, checkpoint_path, ensure_models
    from hypernet.base_models import UNetLayout

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(checkpoint_path(ensure_models(in_process=True))), output_vae=True, output_clip=True)
    names = _write_loras(args.work, UNetLayout.from_unet_config("synthetic", UNET_CONFIG), 16)
    device = comfy.model_management.get_torch_device()
    size = 256 if device.type == "cuda" else 64  # the CPU stands in: the code path, at the smallest useful size
    images = [torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    stamps: list[tuple[int, float]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, *_, **__: stamps.append((value, time.perf_counter())))
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    with torch.inference_mode():
        _, _, merged, report, _ = nodes.NODE_CLASS_MAPPINGS["LoraRarZipLora"]().optimise(
            model, clip, vae, *names, images[0], "a photo of sks dog", images[1], "a watercolor painting", 3, 0.01,
            0.01, 0, 0.0)
    comfy.utils.set_progress_bar_global_hook(None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    step_s = (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])
    start, end = _loss_totals(report)
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of sks dog")[0]
    sampled: list[float] = []
    latent = torch.zeros(1, 4, size // 8, size // 8)
    with torch.inference_mode():
        comfy.sample.sample(model, torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)), 3, 2.0,
                            "euler", "normal", cond, cond, latent,
                            callback=lambda *_: sampled.append(time.perf_counter()), disable_pbar=True)
    sample_s = (sampled[-1] - sampled[0]) / (len(sampled) - 1) if len(sampled) > 1 else float("nan")
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), (start, end)))
    return {"check": "ZipLoRA: optimisation steps on the device", "device": str(device),
            "model_dtype": str(model.model.get_dtype()), "image_px": size, "loss_start": start, "loss_end": end,
            "step_s": step_s, "sampling_step_s": sample_s, "peak_device_mb": peak,
            "rank": sorted({layer.rank for layer in merged.layers.values()})[-1], "ok": finite and end < start}


def _training_dataset(work: Path, layout, rank: int) -> Path:
    """devkit's synthetic dataset (2 x 2 training pairs) with random rank-``rank`` attention LoRAs for ``layout``;
    the images are not encoded (worker_train draws random latents)."""
    from devkit.training_data import build_dataset

    root = work / "training-data"
    return root if (root / "split.json").is_file() else build_dataset(root, layout, images=1, rank=rank)


def worker_train(args) -> dict:
    """Training steps of a LoRA.rar hypernetwork (python -m hypernet train's loop and ComfyUI adapter): on a GPU the
    SDXL-architecture UNet (2.6 B parameters, random fp16 weights) at 1024 px with rank-64 LoRAs on all 560
    attention layers, fp16 autocast, with and without gradient checkpointing: seconds per step and peak memory;
    the first step's gradient norm must agree between the two. The CPU stands in with the synthetic model at 64 px."""
    nodes = comfy_in_process(args.comfy, args.work, args.weights, args.mode)

    import importlib

    import torch

    import comfy.model_management
    from devkit.synthetic_models import sdxl_unet_patcher
    from hypernet.base_models import UNetLayout

    root = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].__module__.rsplit(".nodes.merge", 1)[0]
    adapter = importlib.import_module(f"{root}.nodes.adapter.training")
    training = {name: importlib.import_module(f"{root}.hypernet.training.{name}") for name in ("dataset", "recipe", "trainer")}
    device = comfy.model_management.get_torch_device()
    gpu = device.type == "cuda"
    model = sdxl_unet_patcher() if gpu else _synthetic_model()
    with torch.no_grad():  # zero weights would make every activation, loss and gradient 0
        generator = torch.Generator().manual_seed(0)
        for parameter in model.model.diffusion_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.model.requires_grad_(False)
    layout = UNetLayout.from_unet_config("train-check", model.model.model_config.unet_config)
    dataset = training["dataset"].load_dataset(_training_dataset(args.work, layout, 64 if gpu else 4))
    resolution, steps = (1024, 3) if gpu else (64, 1)
    size = resolution // 8
    encodings = {f"{kind}/{name}": {"latents": [torch.randn(4, size, size, generator=generator)], "caption": "",
                                    "conditioning": [torch.randn(1, 77, 2048, generator=generator),
                                                     {"pooled_output": torch.randn(1, 1280, generator=generator)}]}
                 for kind, name in dataset.entries}
    widths = adapter.attention_widths(model)
    result = {"check": "training steps (python -m hypernet train)", "device": str(device), "image_px": resolution,
              "lora_rank": 64 if gpu else 4, "layers": len(layout.attention_linears())}
    norms = []
    for checkpointing in (True, False):
        recipe = training["recipe"].Recipe(resolution=resolution, epochs=steps + 1, steps_per_pair=1,
                                           mixed_precision="fp16" if gpu else "no", gradient_checkpointing=checkpointing)
        task = adapter.ComfyTask(model, dataset, encodings, recipe)
        net = importlib.import_module(f"{root}.hypernet.model").new_hypernet(widths, seed=0)
        trainer = training["trainer"].Trainer(net, task, dataset.pairs("train"), [], recipe,
                                              args.work / f"run-{checkpointing}", checkpoint_every=0, validate_every=0,
                                              log=lambda _: None)
        tag = "checkpointing" if checkpointing else "no_checkpointing"
        try:
            with adapter.loaded(task.patched), torch.inference_mode(False), torch.enable_grad():
                norms.append(trainer.train_step()["grad_norm"])  # warm-up (kernels, caches), then measured
                torch.cuda.synchronize() if gpu else None
                torch.cuda.reset_peak_memory_stats() if gpu else None
                started = time.perf_counter()
                losses = [trainer.train_step()["total"] for _ in range(steps)]
                torch.cuda.synchronize() if gpu else None
                step_s = (time.perf_counter() - started) / steps
        except torch.cuda.OutOfMemoryError:  # without checkpointing the activations may not fit: a number too
            result[f"{tag}"] = "out of memory"
            continue
        finally:
            del trainer, task
        result[f"step_s_{tag}"] = step_s
        result[f"peak_mb_{tag}"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
        result[f"finite_{tag}"] = all(v == v and abs(v) != float("inf") for v in losses)
    agree = abs(norms[0] - norms[1]) / max(abs(norms[1]), 1e-30) if len(norms) == 2 else None
    result["grad_norm_agreement"] = agree
    result["ok"] = bool(result.get("finite_checkpointing")) and (agree is None or agree < 2e-2)
    return result


def worker_all(args) -> dict:
    """Every task of ``--tasks`` in this one process (the CPU standing in: one memory mode, ComfyUI imported once)."""
    results = {}
    for task in args.tasks.split(","):
        try:
            results[task] = WORKERS[task](args)
        except Exception as error:  # noqa: BLE001  (one check's failure is its row, the others still run)
            results[task] = {"error": f"{task}: {type(error).__name__}: {error}"}
    return results


WORKERS = {"speed": worker_speed, "sample": worker_sample, "fp16": worker_fp16, "ziplora": worker_ziplora,
           "train": worker_train, "all": worker_all}


class Workers:
    """The checks that need ComfyUI. On a GPU each runs in its own python, since ComfyUI's memory mode is fixed per
    process; with the CPU standing in there is one mode, so one python runs them all (ComfyUI imported once)."""

    def __init__(self, args, simulated: bool, tasks: list[str]):
        self.args, self.together = args, None
        if simulated and tasks:
            self.together = run_worker("all", args, ["--mode", "cpu", "--latent", "16", "--tasks", ",".join(tasks)],
                                       timeout=1200)

    def run(self, task: str, mode: str, extra: tuple[str, ...] = ()) -> dict:
        if self.together is not None:
            return self.together.get(task, self.together)  # the shared process's own failure is every check's
        return run_worker(task, self.args, ["--mode", mode, *extra], timeout=600)


def check_sampling(workers: Workers, device_modes: list[str]) -> list[dict]:
    import torch

    latent = ("--latent", "64")  # 512 px (the CPU's stand-in: 128 px)
    reference = workers.run("sample", "cpu", latent)
    if "error" in reference or "skip" in reference:
        return [_row("one sampling step", reference)]
    expected = torch.load(reference["path"], weights_only=True)
    results = []
    for mode in device_modes:
        # with the CPU standing in, the device's run is the reference run: the comparison's code runs, not the model twice
        result = reference if mode == "cpu" else workers.run("sample", mode, latent)
        if "error" in result or "skip" in result:
            results.append(_row(f"one sampling step ({mode})", result))
            continue
        got = torch.load(result["path"], weights_only=True)
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        results.append({"check": f"one sampling step ({mode}) vs CPU", "patcher": result["patcher"],
                        "model_dtype": result["dtype"], "finite": bool(torch.isfinite(got).all()),
                        "max_relative_error": error, "ok": bool(torch.isfinite(got).all()) and error <= SAMPLE_TOLERANCE})
    return results


def _row(check: str, result: dict) -> dict:
    """A worker's result as a table row: its own, or named after the check when it failed or was skipped."""
    if "error" in result or "skip" in result:
        return {"check": check, **result, "ok": False}
    return result


def table(results: list[dict]) -> str:
    lines = ["| check | result | numbers |", "|---|---|---|"]
    for result in results:
        status = "SKIP" if "skip" in result else "FAIL" if not result.get("ok") else "PASS"
        numbers = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in result.items() if k not in ("check", "ok")}
        lines.append(f"| {result['check']} | {status} | {', '.join(f'{k}={v}' for k, v in numbers.items())} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--simulate-on-cpu", action="store_true", help="run every check with the CPU as the device")
    parser.add_argument("--comfy", help="ComfyUI folder (default: the host of devkit/hosts.json, or .gpu/ComfyUI)")
    parser.add_argument("--weights", help="folder with the published hypernets")
    parser.add_argument("--work", help="scratch folder for LoRAs, models and outputs (default: a temp folder)")
    parser.add_argument("--skip", action="append", default=[], choices=["golden", "speed", "sample", "fp16", "ziplora", "train"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--latent", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.weights = weights_dir(args.weights)
    args.work = Path(args.work or tempfile.mkdtemp(prefix="lorarar-gpu-check-"))
    if args.comfy is None and (REPO / ".gpu" / "ComfyUI" / "main.py").is_file():
        args.comfy = str(REPO / ".gpu" / "ComfyUI")
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.simulate_on_cpu:
        log(f"no CUDA GPU on this machine (torch {torch.__version__}): nothing to check")
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.simulate_on_cpu else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (simulated device)"
    log(f"device: {name}; torch {torch.__version__}; work folder {args.work}")
    start, results = time.perf_counter(), []
    if "golden" not in args.skip:
        results.append(check_golden(device, args.weights))
    device_mode = "default" if device == "cuda" else "cpu"
    workers = Workers(args, device == "cpu", [task for task in WORKERS if task != "all" and task not in args.skip])
    if "speed" not in args.skip:
        results.append(_row("merge node vs two stock LoraLoaders", workers.run("speed", device_mode)))
    if "sample" not in args.skip:
        results += check_sampling(workers, ["default", "lowvram"] if device == "cuda" else ["cpu"])
    if "fp16" not in args.skip:
        results.append(_row("float16 LoRA arithmetic", workers.run("fp16", device_mode)))
    if "ziplora" not in args.skip:
        results.append(_row("ZipLoRA: optimisation steps on the device", workers.run("ziplora", device_mode)))
    if "train" not in args.skip:
        results.append(_row("training steps (python -m hypernet train)", workers.run("train", device_mode)))
    print(f"\nLoRA.rar GPU check on {name} ({time.perf_counter() - start:.0f} s)\n\n{table(results)}")
    return 0 if all(result.get("ok") or "skip" in result for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
