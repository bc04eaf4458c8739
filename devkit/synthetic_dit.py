"""Tiny random-weight DiT diffusion models (Flux, SD3.5) that ComfyUI's own detection accepts.

The issue-12 tests need models of the DiT families without downloading gigabytes, so each family is
built here at a toy width and depth, with the tensor shapes ComfyUI's ``comfy/model_detection.py``
reads chosen so that what it infers (hidden size, heads, depth, context / pooled widths, patch size,
latent channels) is consistent and a forward pass runs:

    <root>/diffusion_models/lorarar-synthetic-flux.safetensors
        Flux-dev layout (BFL key names, norms as ``*_norm.scale``): hidden 256 = 2 heads x 128
        (the head width is fixed by the RoPE axes 16+56+56), 2 double + 2 single blocks,
        img_in 64 = 16 latent channels x 2x2 patch, txt_in 4096 (T5-XXL width),
        vector_in 768 (CLIP-L pooled width), guidance_in present (so: class ``Flux``, not ``FluxSchnell``).
    <root>/diffusion_models/lorarar-synthetic-sd35.safetensors
        SD3.5-Medium layout (MMDiT-X): depth 2 -> hidden 2 x 64 = 128, 2 heads of 64, 2 joint blocks,
        RMS q/k norms, a second self-attention (``x_block.attn2``) in block 0, 16 latent channels,
        2x2 patches, context_embedder 4096 -> 128, y_embedder 2048 (CLIP-L + CLIP-G pooled), pos_embed
        for a 32x32 patch grid. Class ``SD3``.
    <root>/vae_approx/taesd3_encoder.safetensors, taesd3_decoder.safetensors
        a random TAESD3 (16 latent channels), so stock ``VAELoader(vae_name="taesd3")`` decodes their latents.

Both are float16 on disk, deterministic (fixed seed, keys in sorted order) and cached: ``ensure_dit()``
builds a file only when it is missing or was made by another recipe version (safetensors metadata).
The build asks the running host's own detection for the model config (from the detection keys alone),
so it needs torch and ComfyUI's ``comfy``; like devkit/synthetic_models.py it runs in a subprocess with
the host python unless ``in_process=True``.

Loading, conditioning and one sampling step (``load_patcher``, ``conditioning``, ``sample_step``) need
comfy imported in the calling process (host tests).

CLI::

    .host/0.33.0/venv/bin/python devkit/synthetic_dit.py [--dir D] [--force] [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (ensure_dit builds in a subprocess): devkit must import
    sys.path.insert(0, str(REPO))

from devkit.synthetic_models import (  # noqa: E402
    _import_comfy, _locked, _randomize, _save_atomic, default_dir, host_python,
)

# Bump when a recipe changes: files made by another version are rebuilt.
RECIPE_VERSION = 1
SEED = 20261126
FLUX_HEAD_DIM = 128  # sum of Flux's RoPE axes_dim (16, 56, 56): every Flux head is this wide


@dataclass(frozen=True)
class DitFamily:
    """One DiT family's synthetic model and the conditioning its forward pass needs.

    ``detection_shapes``: the tensors ComfyUI's detection reads (name -> shape); the host derives the
    full config from them. ``context_dim``: width of the cross-attention tokens (B, tokens, context_dim).
    ``pooled_dim``: width of ``pooled_output`` (B, pooled_dim), None when the family takes none.
    ``guidance``: whether the conditioning carries a distilled-guidance value (Flux dev).
    """

    name: str
    file: str
    model_class: str
    hidden_size: int
    heads: int
    latent_channels: int
    context_dim: int
    pooled_dim: int | None
    guidance: bool
    detection_shapes: dict = field(default_factory=dict)

    def path(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root or default_dir()) / self.file


def _flux_shapes(hidden: int, double: int, single: int) -> dict:
    shapes = {"img_in.weight": (hidden, 16 * 2 * 2), "txt_in.weight": (hidden, 4096),
              "vector_in.in_layer.weight": (hidden, 768), "guidance_in.in_layer.weight": (hidden, 256)}
    for i in range(double):
        shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (FLUX_HEAD_DIM,)
    for i in range(single):
        shapes[f"single_blocks.{i}.linear1.weight"] = (hidden * 3 + hidden * 4, hidden)
    return shapes


def _sd35_shapes(depth: int) -> dict:
    hidden = 64 * depth  # ComfyUI reads the MMDiT depth as x_embedder width // 64
    return {"x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (2 * 2 * 16, hidden),
            "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
            "pos_embed": (1, 32 * 32, hidden), "joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
            "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
            "joint_blocks.0.x_block.attn2.qkv.weight": (3 * hidden, hidden)}


FLUX = DitFamily("flux", "diffusion_models/lorarar-synthetic-flux.safetensors", "Flux", hidden_size=256, heads=2,
                 latent_channels=16, context_dim=4096, pooled_dim=768, guidance=True,
                 detection_shapes=_flux_shapes(256, double=2, single=2))
SD35 = DitFamily("sd35", "diffusion_models/lorarar-synthetic-sd35.safetensors", "SD3", hidden_size=128, heads=2,
                 latent_channels=16, context_dim=4096, pooled_dim=2048, guidance=False,
                 detection_shapes=_sd35_shapes(depth=2))
FAMILIES = {family.name: family for family in (FLUX, SD35)}

# A random TAESD3 (16 latent channels) beside the models, so that stock VAELoader(vae_name="taesd3") decodes a
# Flux / SD3 latent. Weights only: nodes.VAELoader.load_taesd adds SD3's vae_scale 1.5305 / vae_shift 0.0609
# itself on both hosts. ``missing()`` calls it "taesd3".
TAESD3 = "taesd3"
TAESD3_FILES = {"vae_approx/taesd3_encoder.safetensors": "taesd_encoder.",
                "vae_approx/taesd3_decoder.safetensors": "taesd_decoder."}
TAESD3_LATENT_CHANNELS = 16


def _recipe_of(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("lorarar_synthetic_dit")
    except Exception:  # safetensors raises its own error type: a missing, truncated or foreign file counts as missing
        return None


def missing(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the families (and "taesd3") whose files ensure_dit() would (re)build."""
    root = Path(root or default_dir())
    names = [name for name, family in FAMILIES.items() if _recipe_of(family.path(root)) != str(RECIPE_VERSION)]
    if any(_recipe_of(root / rel) != str(RECIPE_VERSION) for rel in TAESD3_FILES):
        names.append(TAESD3)
    return names


def ensure_dit(dir: str | os.PathLike | None = None, *, in_process: bool = False, timeout: float = 600) -> Path:
    """Build whatever family file is missing under the models root and return the root (absolute)."""
    root = Path(dir or default_dir()).resolve()
    if not missing(root):
        return root
    if in_process:
        build(root)
        return root
    cmd = [str(host_python()), str(Path(__file__).resolve()), "--dir", str(root)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0 or missing(root):
        raise RuntimeError(f"building synthetic DiT models failed (rc={proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stdout[-6000:]}")
    return root


# --------------------------------------------------------------------------------------------
# Build (needs torch + comfy)
# --------------------------------------------------------------------------------------------

def host_config(family: DitFamily) -> dict:
    """The model config the running host's detection derives from the family's detection tensors.

    Flux: hosts up to 0.3.75 hard-code 24 heads whatever the width; the heads are set here from the
    width (hidden // 128, what 0.33.0's detection computes) so the tiny model is consistent.
    """
    import torch

    import comfy.model_detection

    probe = {name: torch.empty(shape, device="meta") for name, shape in family.detection_shapes.items()}
    config = comfy.model_detection.detect_unet_config(probe, "")
    if family is FLUX:
        config["num_heads"] = config["hidden_size"] // FLUX_HEAD_DIM
    return config


def _disk_name(family: DitFamily, model_key: str) -> str:
    """Model parameter name -> the name in a released file (Flux norm gains are ``.scale`` there)."""
    if family is FLUX and model_key.endswith("_norm.weight"):
        return model_key[:-len(".weight")] + ".scale"
    return model_key


def build_state_dict(family: DitFamily, seed: int = SEED) -> dict:
    """Random float16 weights of the family's tiny model, keyed as in a released diffusion-model file."""
    import torch

    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(host_config(family))
    if type(model_config).__name__ != family.model_class:
        raise RuntimeError(f"{family.name}: config matched {type(model_config).__name__}, expected {family.model_class}")
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, device="meta")
    shapes = {_disk_name(family, k): v for k, v in model.diffusion_model.state_dict().items()}
    ordered = {k: shapes[k] for k in sorted(shapes)}  # the same tensors whichever host builds
    state = _randomize(ordered, torch.Generator().manual_seed(seed), torch.float16)
    for key in state:
        if key.endswith("_norm.scale"):  # RMS gains: ones, like _randomize gives 1-dim ``*.weight``
            state[key] = torch.ones_like(state[key])
    return state


def build_taesd3(root: Path, seed: int = SEED) -> list[str]:
    """Write the random TAESD3 encoder and decoder files (float16, ComfyUI's TAESD layout); returns their paths."""
    import torch

    import comfy.taesd.taesd

    model = comfy.taesd.taesd.TAESD(latent_channels=TAESD3_LATENT_CHANNELS)
    state = _randomize(model.state_dict(), torch.Generator().manual_seed(seed), torch.float16)
    for rel, part in TAESD3_FILES.items():
        _save_atomic({k[len(part):]: v for k, v in state.items() if k.startswith(part)}, root / rel,
                     {"lorarar_synthetic_dit": str(RECIPE_VERSION)})
    return list(TAESD3_FILES)


def build(root: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Build the missing family files and TAESD3 (all with force=True). Returns {"built": [...], "seconds": {...}}."""
    root = Path(root or default_dir()).resolve()
    with _locked(root):
        todo = [*FAMILIES, TAESD3] if force else missing(root)
        report = {"root": str(root), "built": [], "seconds": {}}
        if not (root / ".gitignore").exists():
            (root / ".gitignore").write_text("*\n")
        if not todo:
            return report
        _import_comfy()
        if TAESD3 in todo:
            started = time.perf_counter()
            report["built"] += build_taesd3(root)
            report["seconds"][TAESD3] = round(time.perf_counter() - started, 2)
        for name in [name for name in todo if name in FAMILIES]:
            family = FAMILIES[name]
            started = time.perf_counter()
            state = build_state_dict(family)
            _save_atomic(state, family.path(root), {"lorarar_synthetic_dit": str(RECIPE_VERSION),
                                                    "lorarar_model_class": family.model_class})
            report["built"].append(family.file)
            report["seconds"][name] = round(time.perf_counter() - started, 2)
        return report


# --------------------------------------------------------------------------------------------
# Load, condition, sample (comfy imported by the caller)
# --------------------------------------------------------------------------------------------

def detected_class(family: DitFamily, root: str | os.PathLike | None = None) -> str:
    """The supported-model class name the host's detection picks for the saved file."""
    import comfy.model_detection
    import comfy.utils

    state = comfy.utils.load_torch_file(str(family.path(root)))
    config = comfy.model_detection.model_config_from_unet(state, "")
    return type(config).__name__ if config is not None else "None"


def load_patcher(family: DitFamily, root: str | os.PathLike | None = None):
    """(ModelPatcher, how) for the saved model, float32 on the CPU.

    ``how`` is "load_diffusion_model_state_dict" when ComfyUI's own loader builds it from the file. On
    hosts whose detection cannot build the tiny model (Flux on 0.3.75: 24 heads are hard-coded, so only a
    3072-wide Flux loads) it is "detected config, heads from width": the same detection, the same
    supported-model class, with num_heads corrected as host_config() does, then ComfyUI's own
    model-config loading steps.
    """
    import torch

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(str(family.path(root)))
    detected = comfy.model_detection.detect_unet_config(state, "")
    if family is not FLUX or detected["num_heads"] * FLUX_HEAD_DIM == detected["hidden_size"]:
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
        return patcher, "load_diffusion_model_state_dict"
    model_config = comfy.model_detection.model_config_from_unet_config(host_config(family), state)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "")
    model.load_model_weights(model_config.process_unet_state_dict(state), "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, "detected config, heads from width"


def conditioning(family: DitFamily, *, batch: int = 1, tokens: int = 8, seed: int = 0) -> list:
    """A ComfyUI CONDITIONING for the family, built directly (the real text encoders are gigabytes).

    [[cross_attn (batch, tokens, context_dim), {"pooled_output": (batch, pooled_dim), "guidance": 3.5}]]
    with the pooled vector only where the family takes one and guidance only for Flux dev. The same tensors
    as the test node LoraRarTestConditioning gives for the family's model with the same seed.
    """
    from devkit.comfy_nodes.lorarar_test_nodes import random_conditioning

    return random_conditioning(family.context_dim, family.pooled_dim, family.guidance, batch=batch, tokens=tokens,
                               seed=seed)


def sample_step(patcher, family: DitFamily, *, size: int = 16, seed: int = 0):
    """One euler step of comfy.sample.sample on an empty (1, channels, size, size) latent; returns the latent."""
    import torch

    import comfy.sample

    latent = torch.zeros(1, family.latent_channels, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = conditioning(family, seed=seed), conditioning(family, seed=seed + 1)
    return comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def verify(root: str | os.PathLike | None = None) -> dict:
    """What the running host sees in each family file and one sampling step's output statistics."""
    _import_comfy()
    out = {}
    for name, family in FAMILIES.items():
        started = time.perf_counter()
        patcher, how = load_patcher(family, root)
        config = patcher.model.model_config.unet_config
        result = sample_step(patcher, family)
        out[name] = {"detected_class": detected_class(family, root), "loaded_via": how,
                     "params_m": round(sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6, 2),
                     "config": {k: config.get(k) for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks",
                                                           "context_in_dim", "vec_in_dim", "patch_size",
                                                           "in_channels", "adm_in_channels", "qk_norm",
                                                           "x_block_self_attn_layers") if k in config},
                     "step_shape": list(result.shape), "step_finite": bool(result.isfinite().all()),
                     "seconds": round(time.perf_counter() - started, 2)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help=f"models root (default {default_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--verify", action="store_true", help="load each model with comfy and run one step")
    args = parser.parse_args(argv)
    root = Path(args.dir or default_dir()).resolve()
    report = build(root, force=args.force)
    print(f"built {report['built']} in {report['seconds']}" if report["built"] else f"all cached under {root}")
    for family in FAMILIES.values():
        print(f"  {family.path(root)}  {family.path(root).stat().st_size / 2**20:.2f} MiB")
    if args.verify:
        print(json.dumps(verify(root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
