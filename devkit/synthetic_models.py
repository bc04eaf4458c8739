"""Random-weight models that ComfyUI's own detection accepts, laid out as a ComfyUI models folder.

Nothing can be downloaded here, so the tests build their own models:

    <root>/checkpoints/lorarar-synthetic-sdxl-family.safetensors
        UNet + CLIP-L + CLIP-G + VAE in the SDXL checkpoint layout (``model.diffusion_model.*``,
        ``conditioner.embedders.0.transformer.*``, ``conditioner.embedders.1.model.*``,
        ``first_stage_model.*``), loadable by the stock ``CheckpointLoaderSimple`` node.
        The UNet is a cut-down SDXL-family UNet that comfy/model_detection.py detects as
        ``KOALA_700M``: channel_mult [1, 2, 4] (widths 320/640/1280), one res block per level,
        transformer_depth [0, 2, 5] (2 transformer blocks at width 640, 5 at width 1280),
        no middle block and no decoder transformers. Its attention linears therefore have the
        widths 640 and 1280 that a LoRA.rar hypernet expects.
        The text encoders are full-size random CLIP-L / CLIP-G (their configs are fixed).
        The embedded VAE is a random TAESD (the cheapest VAE the checkpoint loader accepts).
    <root>/vae_approx/taesdxl_encoder.safetensors, taesdxl_decoder.safetensors
        a random TAESDXL, so ``VAELoader(vae_name="taesdxl")`` works (fast decode).
    <root>/checkpoints/lorarar-synthetic-sd15.safetensors  (``ensure_sd15_model()``, built on demand)
        UNet + CLIP-L + VAE in the SD 1.5 checkpoint layout (``cond_stage_model.transformer.*``), that
        comfy/model_detection.py detects as ``SD15``: model_channels 320, context_dim 768, conv proj_in,
        channel_mult [1, 2, 4] (attention widths 320/640/1280), one res block and one transformer
        block per level, no middle block and no decoder transformers. CLIP-L is full size (its config
        is fixed); the VAE is a random TAESD scaled like ComfyUI's "taesd".

Everything is fp16 on disk, deterministic (fixed seed), written atomically (hypernet.files.atomic_file)
and cached: ``ensure_models()`` only builds what is missing or was made by an
older recipe. Default root: ``<repo>/.cache/synthetic`` (env ``LORARAR_SYNTHETIC_DIR``).

The build needs torch and ComfyUI's ``comfy`` package; ``ensure_models()`` runs it in a
subprocess with the host venv's python so the calling process never imports ``comfy``.

CLI::

    .host/0.33.0/venv/bin/python devkit/synthetic_models.py [--dir D] [--force] [--verify] [--sd15]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (ensure_models builds in a subprocess): devkit must import
    sys.path.insert(0, str(REPO))

# Bump when the recipe changes: cached files made by another version are rebuilt.
RECIPE_VERSION = 1
SEED = 20240611

CHECKPOINT_NAME = "lorarar-synthetic-sdxl-family.safetensors"
CHECKPOINT = "checkpoints/" + CHECKPOINT_NAME
TAESDXL_ENCODER = "vae_approx/taesdxl_encoder.safetensors"
TAESDXL_DECODER = "vae_approx/taesdxl_decoder.safetensors"
FILES = (CHECKPOINT, TAESDXL_ENCODER, TAESDXL_DECODER)
MANIFEST = "lorarar-synthetic.json"

EXPECTED_MODEL_CLASS = "KOALA_700M"

# The config comfy/model_detection.py derives from the saved state dict (checked by --verify).
# KOALA_700M matches on model_channels 320, context_dim 2048, adm_in_channels 2816,
# use_linear_in_transformer and transformer_depth [0, 2, 5]; the rest is free to shrink.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 2, 5],
    "transformer_depth_output": [0, 0, 0, 0, 0, 0],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": -2,  # -2: no middle block at all
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

TAESDXL_SCALE = 0.13025  # what nodes.VAELoader.load_taesd uses for "taesdxl"

# SD 1.5: its own file and manifest (so the SDXL-family files above are not rebuilt when this recipe changes)
SD15_RECIPE_VERSION = 1
SD15_CHECKPOINT_NAME = "lorarar-synthetic-sd15.safetensors"
SD15_CHECKPOINT = "checkpoints/" + SD15_CHECKPOINT_NAME
SD15_MANIFEST = "lorarar-synthetic-sd15.json"
SD15_MODEL_CLASS = "SD15"
SD15_WIDTHS = (320, 640, 1280)
TAESD_SCALE = 0.18215  # what nodes.VAELoader.load_taesd uses for "taesd" (SD 1.x latents)

# SD15 matches on model_channels 320, context_dim 768, conv proj_in (use_linear_in_transformer False) and no
# adm input; depth and levels are free: one transformer block per level gives the three SD 1.5 widths.
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 0, 0, 0],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": -2,  # -2: no middle block at all
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

_ATTN_RE = re.compile(
    r"^model\.diffusion_model\.(?P<name>.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$"
)


def default_dir() -> Path:
    env = os.environ.get("LORARAR_SYNTHETIC_DIR")
    return Path(env) if env else REPO / ".cache" / "synthetic"


def _running_host() -> Path | None:
    """The host folder whose venv runs this interpreter (``<host>/venv/bin/python``), if any."""
    folder = Path(sys.prefix).parent
    return folder if (folder / "ComfyUI" / "main.py").is_file() else None


def _default_host() -> Path:
    from devkit.hosts import host_folder

    return host_folder()


def comfy_root() -> Path:
    """ComfyUI of the host under test: $LORARAR_COMFY, else the host whose python runs us, else the default host."""
    env = os.environ.get("LORARAR_COMFY")
    return Path(env) if env else (_running_host() or _default_host()) / "ComfyUI"


def comfy_version() -> str:
    """The version of the host under test, read from its comfyui_version.py ("unknown" when absent)."""
    try:
        match = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy_root() / "comfyui_version.py").read_text())
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


def host_python() -> Path:
    env = os.environ.get("LORARAR_PYTHON")
    return Path(env) if env else (_running_host() or _default_host()) / "venv" / "bin" / "python"


# The SDXL base UNet's configuration as ComfyUI detects it (2.6 B parameters), for full-size speed rows.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def sdxl_unet_patcher():
    """A ModelPatcher around an SDXL-architecture UNet built with ComfyUI's classes, float16, weights zeroed
    (resident like a loaded checkpoint; their values do not change the timings). Needs comfy imported."""
    import torch

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET_CONFIG))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def checkpoint_path(root: str | os.PathLike | None = None, checkpoint: str = CHECKPOINT) -> Path:
    return Path(root or default_dir()) / checkpoint


def sd15_checkpoint_path(root: str | os.PathLike | None = None) -> Path:
    return checkpoint_path(root, SD15_CHECKPOINT)


def _read_manifest(root: Path, name: str = MANIFEST) -> dict:
    try:
        return json.loads((root / name).read_text())
    except (OSError, ValueError):
        return {}


def missing_sd15(root: str | os.PathLike | None = None) -> list[str]:
    """[SD15_CHECKPOINT] when ensure_sd15_model() would (re)build it, else []."""
    root = Path(root or default_dir())
    if _read_manifest(root, SD15_MANIFEST).get("version") != SD15_RECIPE_VERSION:
        return [SD15_CHECKPOINT]
    return [] if (root / SD15_CHECKPOINT).is_file() else [SD15_CHECKPOINT]


def ensure_sd15_model(dir: str | os.PathLike | None = None, *, in_process: bool = False,
                      timeout: float = 900) -> Path:
    """Build the synthetic SD 1.5 checkpoint if it is missing and return the models root (absolute); the file is
    ``<root>/checkpoints/lorarar-synthetic-sd15.safetensors`` (CheckpointLoaderSimple name SD15_CHECKPOINT_NAME).
    Same cache folder, lock and subprocess build as ensure_models()."""
    root = Path(dir or default_dir()).resolve()
    if not missing_sd15(root):
        return root
    if in_process:
        build_sd15(root)
        return root
    _build_in_subprocess(root, ["--sd15"], timeout, missing_sd15)
    return root


def missing(root: str | os.PathLike | None = None) -> list[str]:
    """Relative paths that ensure_models() would (re)build."""
    root = Path(root or default_dir())
    if _read_manifest(root).get("version") != RECIPE_VERSION:
        return list(FILES)
    return [f for f in FILES if not (root / f).is_file()]


def ensure_models(dir: str | os.PathLike | None = None, *, in_process: bool = False,
                  timeout: float = 900) -> Path:
    """Build whatever is missing under the models root and return the root (absolute).

    By default the build runs in a subprocess with the host python (LORARAR_PYTHON), so the
    caller needs neither torch nor comfy; ``in_process=True`` builds in this interpreter.
    """
    root = Path(dir or default_dir()).resolve()
    if not missing(root):
        return root
    if in_process:
        build(root)
        return root
    _build_in_subprocess(root, [], timeout, missing)
    return root


def _build_in_subprocess(root: Path, flags: list[str], timeout: float, still_missing) -> None:
    cmd = [str(host_python()), str(Path(__file__).resolve()), "--dir", str(root), *flags]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or still_missing(root):
        raise RuntimeError(f"building synthetic models failed (rc={proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stdout[-6000:]}")


# --------------------------------------------------------------------------------------------
# Build (needs torch + comfy)
# --------------------------------------------------------------------------------------------

def import_comfy():
    """Import ComfyUI's comfy package from the host checkout, forced onto the CPU."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args  # noqa: F401  (parses no argv unless comfy.options says so)
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    return comfy


@contextlib.contextmanager
def locked(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def randomize(meta_sd: dict, gen, dtype=None) -> dict:
    """Fresh random tensors shaped like ``meta_sd`` (which may live on the meta device).

    Weights with >=2 dims: uniform with std 1/sqrt(fan_in) (activations keep their scale);
    1-dim ``*.weight`` (norm gains): ones; biases and other vectors: zeros.
    """
    import torch

    out = {}
    for k, v in meta_sd.items():
        dt = dtype if (dtype is not None and v.dtype.is_floating_point) else v.dtype
        if v.dim() >= 2:
            fan_in = math.prod(v.shape[1:])
            bound = math.sqrt(3.0 / fan_in)
            t = torch.empty(tuple(v.shape), dtype=dt).uniform_(-bound, bound, generator=gen)
        elif v.dim() == 1 and k.endswith("weight"):
            t = torch.ones(tuple(v.shape), dtype=dt)
        else:
            t = torch.zeros(tuple(v.shape), dtype=dt)
        out[k] = t
    return out


def save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    from hypernet.files import atomic_file

    with atomic_file(path) as temp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=metadata)


def build(root: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Build the missing files (all of them with force=True). Returns a report dict."""
    root = Path(root or default_dir()).resolve()
    with locked(root):
        todo = list(FILES) if force else missing(root)
        report = {"root": str(root), "built": [], "seconds": {}}
        # Keep the folder out of git wherever it lives.
        gi = root / ".gitignore"
        if not gi.exists():
            gi.write_text("*\n")
        if not todo:
            return report

        t0 = time.perf_counter()
        comfy = import_comfy()
        import torch

        report["seconds"]["import_comfy"] = round(time.perf_counter() - t0, 2)
        gen = torch.Generator().manual_seed(SEED)
        fp16 = torch.float16

        # TAESD first (tiny) so the checkpoint's embedded VAE and the taesdxl files match.
        taesd_sd = randomize(comfy.taesd.taesd.TAESD(latent_channels=4).state_dict(), gen, fp16)
        taesd_sd["vae_scale"] = torch.tensor(TAESDXL_SCALE, dtype=torch.float32)
        taesd_sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float32)
        meta = {"lorarar_synthetic": str(RECIPE_VERSION)}
        for rel, part in ((TAESDXL_ENCODER, "taesd_encoder."), (TAESDXL_DECODER, "taesd_decoder.")):
            if rel in todo:
                t = time.perf_counter()
                save_atomic({k[len(part):]: v for k, v in taesd_sd.items() if k.startswith(part)},
                             root / rel, meta)
                report["built"].append(rel)
                report["seconds"][rel] = round(time.perf_counter() - t, 2)

        model_class = None
        if CHECKPOINT in todo:
            t = time.perf_counter()
            model_config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIG))
            model_class = type(model_config).__name__
            if model_class != EXPECTED_MODEL_CLASS:
                raise RuntimeError(f"unet config matched {model_class}, expected {EXPECTED_MODEL_CLASS}")
            model_config.set_inference_dtype(fp16, None)
            model = model_config.get_model({}, device="meta")
            unet_sd = randomize(model.diffusion_model.state_dict(), gen, fp16)
            del model

            clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=fp16)
            clip_sd = randomize(clip.state_dict(), gen, fp16)
            del clip
            for k in list(clip_sd):
                if k.endswith("logit_scale"):
                    clip_sd[k] = torch.tensor(math.log(100.0), dtype=torch.float32)

            # ComfyUI's own saving conversions (what comfy.sd.save_checkpoint applies).
            sd = model_config.process_unet_state_dict_for_saving(unet_sd)
            sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))
            sd.update(model_config.process_vae_state_dict_for_saving(taesd_sd))
            report["seconds"]["randomize"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            save_atomic(sd, root / CHECKPOINT, {
                **meta,
                "lorarar_model_class": model_class,
                "lorarar_unet_config": json.dumps(UNET_CONFIG),
            })
            report["seconds"][CHECKPOINT] = round(time.perf_counter() - t, 2)
            report["built"].append(CHECKPOINT)
            del sd, unet_sd, clip_sd

        manifest = {
            "version": RECIPE_VERSION,
            "seed": SEED,
            "model_class": model_class or _read_manifest(root).get("model_class", EXPECTED_MODEL_CLASS),
            "unet_config": UNET_CONFIG,
            "files": {f: (root / f).stat().st_size for f in FILES},
        }
        _save_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        report["sizes"] = manifest["files"]
        return report


def build_sd15(root: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Build the synthetic SD 1.5 checkpoint when missing (always with force=True). Returns a report dict."""
    root = Path(root or default_dir()).resolve()
    with locked(root):
        report = {"root": str(root), "built": [], "seconds": {}}
        if not (force or missing_sd15(root)):
            return report
        t0 = time.perf_counter()
        comfy = import_comfy()
        import torch

        import comfy.sd1_clip

        # its own seed: the SDXL-family files' generator sequence stays as it was
        gen = torch.Generator().manual_seed(SEED + 15)
        fp16 = torch.float16
        model_config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
        model_class = type(model_config).__name__
        if model_class != SD15_MODEL_CLASS:
            raise RuntimeError(f"unet config matched {model_class}, expected {SD15_MODEL_CLASS}")
        model_config.set_inference_dtype(fp16, None)
        model = model_config.get_model({}, device="meta")
        unet_sd = randomize(model.diffusion_model.state_dict(), gen, fp16)
        del model
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=fp16)
        clip_sd = randomize(clip.state_dict(), gen, fp16)
        del clip
        taesd_sd = randomize(comfy.taesd.taesd.TAESD(latent_channels=4).state_dict(), gen, fp16)
        taesd_sd["vae_scale"] = torch.tensor(TAESD_SCALE, dtype=torch.float32)
        taesd_sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float32)
        sd = model_config.process_unet_state_dict_for_saving(unet_sd)
        sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))
        sd.update(model_config.process_vae_state_dict_for_saving(taesd_sd))
        report["seconds"]["randomize"] = round(time.perf_counter() - t0, 2)
        t = time.perf_counter()
        save_atomic(sd, root / SD15_CHECKPOINT, {
            "lorarar_synthetic": str(SD15_RECIPE_VERSION),
            "lorarar_model_class": model_class,
            "lorarar_unet_config": json.dumps(SD15_UNET_CONFIG),
        })
        report["seconds"][SD15_CHECKPOINT] = round(time.perf_counter() - t, 2)
        report["built"].append(SD15_CHECKPOINT)
        manifest = {"version": SD15_RECIPE_VERSION, "seed": SEED + 15, "model_class": model_class,
                    "unet_config": SD15_UNET_CONFIG,
                    "files": {SD15_CHECKPOINT: (root / SD15_CHECKPOINT).stat().st_size}}
        _save_text_atomic(root / SD15_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        report["sizes"] = manifest["files"]
        return report


def _save_text_atomic(path: Path, text: str) -> None:
    from hypernet.files import atomic_file

    with atomic_file(path) as temp:
        temp.write_text(text)


# --------------------------------------------------------------------------------------------
# Introspection (needs only safetensors)
# --------------------------------------------------------------------------------------------

def attention_inventory(root: str | os.PathLike | None = None,
                        checkpoint: str = CHECKPOINT) -> list[tuple[str, int, int]]:
    """(SGM module name, out_features, in_features) of every UNet attention linear.

    Names are like ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (relative to
    ``model.diffusion_model.``), read from the checkpoint header without loading weights.
    """
    from safetensors import safe_open

    out = []
    with safe_open(str(checkpoint_path(root, checkpoint)), framework="pt") as f:
        for k in f.keys():
            m = _ATTN_RE.match(k)
            if m:
                shape = f.get_slice(k).get_shape()
                out.append((m.group("name"), int(shape[0]), int(shape[1])))
    key = lambda item: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", item[0])]
    return sorted(out, key=key)


def verify(root: str | os.PathLike | None = None, checkpoint: str = CHECKPOINT) -> dict:
    """Load the checkpoint the way CheckpointLoaderSimple does and report what ComfyUI sees."""
    import torch

    root = Path(root or default_dir()).resolve()
    comfy = import_comfy()
    import comfy.lora
    import comfy.sd
    import comfy.utils

    ckpt = root / checkpoint
    sd, metadata = comfy.utils.load_torch_file(str(ckpt), return_metadata=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    detected = comfy.model_detection.detect_unet_config(sd, prefix, metadata=metadata)
    model_config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    t = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True,
                                                                output_clip=True)
    load_s = time.perf_counter() - t
    tokens = clip.tokenize("a photo of a cat")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    latent = torch.zeros(1, 4, 32, 32)
    image = vae.decode(latent)
    lora_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    return {
        "model_class": type(model_config).__name__,
        "loaded_model_class": type(model.model.model_config).__name__,
        "unet_config": {k: detected[k] for k in ("num_res_blocks", "transformer_depth",
                                                  "transformer_depth_output",
                                                  "transformer_depth_middle", "channel_mult",
                                                  "model_channels", "context_dim",
                                                  "adm_in_channels")},
        "load_seconds": round(load_s, 2),
        "unet_params_m": round(sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6, 1),
        "cond_shape": list(cond.shape),
        "pooled_shape": list(pooled.shape),
        "cond_finite": bool(torch.isfinite(cond).all()),
        "vae_class": type(vae.first_stage_model).__name__,
        "decoded_shape": list(image.shape),
        "lora_key_map_entries": len(lora_keys),
    }


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help=f"models root (default {default_dir()})")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--verify", action="store_true",
                   help="also load the checkpoint with comfy and print what it detects")
    p.add_argument("--inventory", action="store_true", help="print the attention inventory")
    p.add_argument("--sd15", action="store_true", help="the synthetic SD 1.5 checkpoint instead of the SDXL-family files")
    a = p.parse_args(argv)

    root = Path(a.dir or default_dir()).resolve()
    files, checkpoint = ((SD15_CHECKPOINT,), SD15_CHECKPOINT) if a.sd15 else (FILES, CHECKPOINT)
    t = time.perf_counter()
    report = (build_sd15 if a.sd15 else build)(root, force=a.force)
    wall = time.perf_counter() - t
    if report["built"]:
        print(f"built in {wall:.1f} s under {root}: {report['seconds']}")
    else:
        print(f"all cached under {root} ({wall:.2f} s)")
    for rel in files:
        flag = "made" if rel in report["built"] else "cached"
        print(f"  {flag:6} {rel}  {_fmt_size((root / rel).stat().st_size)}")
    if a.inventory or a.verify:
        inv = attention_inventory(root, checkpoint)
        widths = {}
        for name, out_f, _ in inv:
            widths[out_f] = widths.get(out_f, 0) + 1
        print(f"attention linears: {len(inv)} by width {dict(sorted(widths.items()))}")
        if a.inventory:
            for name, out_f, in_f in inv:
                print(f"  {name}  {in_f}->{out_f}")
    if a.verify:
        print(json.dumps(verify(root, checkpoint), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
