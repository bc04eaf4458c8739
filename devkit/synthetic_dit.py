"""Tiny random-weight DiT diffusion models that ComfyUI's own detection accepts, and VAEs that decode them.

The DiT tests need models of the families users run without downloading gigabytes, so each family is
built here at the smallest width and depth the host allows, with the tensor shapes ComfyUI's
``comfy/model_detection.py`` reads chosen so that what it infers (hidden size, heads, depth, text widths,
patch size, latent channels) is consistent and a forward pass runs. Under the models root:

    diffusion_models/lorarar-synthetic-flux.safetensors  (``Flux``)
        Flux-dev layout (BFL key names, norms as ``*_norm.scale``): hidden 256 = 2 heads x 128
        (the head width is fixed by the RoPE axes 16+56+56), 2 double + 2 single blocks,
        img_in 64 = 16 latent channels x 2x2 patch, txt_in 4096 (T5-XXL width),
        vector_in 768 (CLIP-L pooled width), guidance_in present (so: class ``Flux``, not ``FluxSchnell``).
    diffusion_models/lorarar-synthetic-sd35.safetensors  (``SD3``)
        SD3.5-Medium layout (MMDiT-X): depth 2 -> hidden 2 x 64 = 128, 2 heads of 64, 2 joint blocks,
        RMS q/k norms, a second self-attention (``x_block.attn2``) in block 0, 16 latent channels,
        2x2 patches, context_embedder 4096 -> 128, y_embedder 2048 (CLIP-L + CLIP-G pooled), pos_embed
        for a 32x32 patch grid.
    diffusion_models/lorarar-synthetic-flux2.safetensors  (``Flux2``)
        Flux.2 Klein layout: hidden 128 = 1 head of 128 (RoPE axes 4 x 32), 1 double + 1 single block,
        SwiGLU MLPs (ratio 3), no biases, 128 latent channels at patch 1, txt_in 7680 (Klein 4B: three
        Qwen3-4B layers of 2560), no pooled vector, no guidance_in (distilled).
    diffusion_models/lorarar-synthetic-krea2.safetensors  (``Krea2``)
        features 128 = 1 head of 128 (1 KV head), 1 single-stream block, 16 latent channels at 2x2 patches;
        text: 12 stacked layers of width 40 (the text-fusion blocks have 20 fixed heads: width 40 is 2 per
        head), so the conditioning is 12 x 40 = 480 wide.
    diffusion_models/lorarar-synthetic-zimage.safetensors  (``ZImage``)
        dim 3840 (fixed by the host: 30 heads of 128), 1 layer + the 2 noise and 2 context refiner layers
        the model always builds, cap_embedder 2560 (Qwen3-4B width), 16 latent channels at 2x2 patches.
        1.7 GiB in float16 (908 M parameters): the largest here, loaded in float16 (see ``DitFamily.dtype``).
    diffusion_models/lorarar-synthetic-qwen-image.safetensors  (``QwenImage``)
        width 3072 (fixed: 24 heads of 128), 1 block, txt_in 3584 (Qwen2.5-VL-7B width), 64 = 16 latent
        channels x 2x2 patch; its latents are Wan 2.1's (B, 16, T, H, W). 725 MiB (380 M parameters, most of
        them the two 3072 -> 18432 modulations), loaded in float16.
    diffusion_models/lorarar-synthetic-wan21.safetensors  (``WAN21_T2V``)
        dim 128 = 1 head, ffn 256, 1 block, 16 latent channels in and out, text 4096 (umT5-XXL),
        latents (B, 16, T, H, W).
    diffusion_models/lorarar-synthetic-wan22.safetensors  (``WAN22_T2V``, the Wan 2.2 5B class)
        as Wan 2.1 with 48 latent channels in and out (what the host reads as Wan 2.2 5B).

Not built: Chroma (the host fixes its distilled-guidance approximator at 64 -> 5120 x 5 layers -> 3072:
278 M parameters, 533 MiB in float16, whatever the transformer's width); HiDream (the host fixes 16 double
+ 32 single blocks of 2560 with 4 experts: 17 B parameters, 32 GiB in float16).

VAEs (``VAES``), random, each loaded by stock ``VAELoader(vae_name=...)`` (``DitFamily.vae`` names it):

    vae_approx/taesd3_{encoder,decoder}.safetensors   "taesd3": TAESD, 16 channels (Flux, SD3.5, Z-Image);
        nodes.VAELoader.load_taesd adds SD3's vae_scale 1.5305 / vae_shift 0.0609 itself on both hosts.
    vae_approx/taef2_{encoder,decoder}.safetensors    "taef2": TAESD's Flux.2 variant, 128 channels (Flux.2);
        0.33.0 only (0.3.75's VAELoader has no taef2).
    vae/lorarar-synthetic-wan21-vae.safetensors       Wan 2.1's own 3-D causal VAE at dim 16 (the host reads the
        width from ``decoder.head.0.gamma``): 16 channels, (B, 16, T, H, W) (Wan 2.1, Qwen-Image, Krea 2).
    vae_approx/lighttaew2_2.safetensors               "lighttaew2_2.safetensors": the tiny video autoencoder
        (TAEHV) for 48 channels (Wan 2.2 5B): 22 MiB, its widths are fixed; the Wan 2.2 VAE's are fixed at 160.

All files are float16 on disk, deterministic (fixed seed; model keys drawn in sorted order, VAE keys in their
module's order) and cached: ``ensure_dit()``
builds a file only when it is missing or was made by another recipe version of that family or VAE
(safetensors metadata), so changing one family's recipe rebuilds that family only. The build asks the running
host's own detection for the model config (from the detection keys alone), so it needs torch and ComfyUI's
``comfy``; like devkit/synthetic_models.py it runs in a subprocess with the host python unless
``in_process=True``. A host lacking a family's class (``FAMILIES_BY_HOST``) cannot build it.

Loading, conditioning and one sampling step (``load_patcher``, ``conditioning``, ``sample_step``) need
comfy imported in the calling process (host tests).

CLI::

    .host/0.33.0/venv/bin/python devkit/synthetic_dit.py [--dir D] [--family NAME ...] [--force] [--verify]
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
    import_comfy, locked, randomize, save_atomic, comfy_version, default_dir, host_python,
)

SEED = 20261126
FLUX_HEAD_DIM = 128  # sum of the RoPE axes of Flux (16, 56, 56) and Flux.2 (4 x 32): every head is this wide
_FLUX_LAYOUT = ("flux", "flux2")  # families whose heads hosts up to 0.3.75 hard-code (see host_config)
_METADATA = "lorarar_synthetic_dit"  # safetensors metadata key holding a file's recipe version


@dataclass(frozen=True)
class SyntheticVae:
    """A random VAE under the models root that stock ``VAELoader(vae_name=name)`` loads.

    ``files``: path under the root -> the prefix its tensors carry in the model's state dict (TAESD keeps its
    encoder and decoder in two files, ``taesd_encoder.`` / ``taesd_decoder.``; "" for one file).
    ``latent_channels``: the channels of the latents it decodes. ``recipe``: bump to rebuild it (and nothing else).
    """

    name: str
    files: dict
    latent_channels: int
    recipe: int = 1


WAN21_VAE_NAME = "lorarar-synthetic-wan21-vae.safetensors"
LIGHTTAEW22_NAME = "lighttaew2_2.safetensors"
WAN21_VAE_DIM = 16  # Wan 2.1's VAE is 96 wide; the host reads the width from decoder.head.0.gamma
VAES = {vae.name: vae for vae in (
    SyntheticVae("taesd3", {"vae_approx/taesd3_encoder.safetensors": "taesd_encoder.",
                            "vae_approx/taesd3_decoder.safetensors": "taesd_decoder."}, 16),
    SyntheticVae("taef2", {"vae_approx/taef2_encoder.safetensors": "taesd_encoder.",
                           "vae_approx/taef2_decoder.safetensors": "taesd_decoder."}, 128),
    SyntheticVae(WAN21_VAE_NAME, {f"vae/{WAN21_VAE_NAME}": ""}, 16),
    SyntheticVae(LIGHTTAEW22_NAME, {f"vae_approx/{LIGHTTAEW22_NAME}": ""}, 48),
)}
# The VAEs each host's stock VAELoader loads (tests/host/test_synthetic_dit.py checks): 0.3.75's lists no taef2,
# and its detection of the Flux.2 VAE itself fixes the width at 128 (about 84 M parameters, 160 MiB in float16), so
# no Flux.2 VAE is built for it.
VAES_BY_HOST = {"0.33.0": tuple(VAES), "0.3.75": tuple(name for name in VAES if name != "taef2")}


@dataclass(frozen=True)
class DitFamily:
    """One DiT family's synthetic model and the conditioning its forward pass needs.

    ``detection_shapes``: the tensors ComfyUI's detection reads (name -> shape); the host derives the
    full config from them. ``config``: entries the detected unet_config must hold (tests check them).
    ``context_dim``: width of the cross-attention tokens (B, tokens, context_dim), as the model's text input
    reads them. ``pooled_dim``: width of ``pooled_output`` (B, pooled_dim), None when the family takes none.
    ``guidance``: whether the conditioning carries a distilled-guidance value (Flux dev).
    ``frames``: latent frames of a family with Wan 2.1-style latents (B, C, T, H, W); None: (B, C, H, W).
    ``vae``: the stock VAELoader ``vae_name`` of the VAE in ``VAES`` that decodes its latents.
    ``dtype``: what ``load_patcher`` loads it in (float16 for the 3072- and 3840-wide ones: half the memory).
    ``recipe``: bump to rebuild this family's file (and no other).

    Test data, written by hand from the family's architecture (never read from the pack, whose table the tests
    check against it), keyword-only and required, so a new family's entry is the one place its tests read:
    ``roles``: (native module regex, role) of every attention linear (role None: the projection's own letter), for
    tests/support/families.py and the roles test. ``attention_classes``: its attention classes under comfy.ldm
    (a subclass's base counts), which the pack's table must name on a host that loads the family.
    ``trained_linears``: how many native linears a LoRA of every format trains (the synthetic-model tests).
    ``recorded``: two switched linears the K-LoRA sampling test records: a query (or fused q/k/v) and an output
    projection, from the text stream or the cross-attention where the family has one.
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
    config: dict = field(default_factory=dict)
    frames: int | None = None
    vae: str = "taesd3"
    dtype: str = "float32"
    recipe: int = 1
    roles: tuple[tuple[str, str | None], ...] = field(kw_only=True)
    attention_classes: tuple[str, ...] = field(kw_only=True)
    trained_linears: int = field(kw_only=True)
    recorded: tuple[str, str] = field(kw_only=True)

    def path(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root or default_dir()) / self.file

    def latent_shape(self, size: int, batch: int = 1) -> tuple[int, ...]:
        """(batch, channels, [frames,] size, size): an empty latent of the family, as sampling returns it."""
        return (batch, self.latent_channels, *(() if self.frames is None else (self.frames,)), size, size)


def _flux_shapes(hidden: int, double: int, single: int) -> dict:
    shapes = {"img_in.weight": (hidden, 16 * 2 * 2), "txt_in.weight": (hidden, 4096),
              "vector_in.in_layer.weight": (hidden, 768), "guidance_in.in_layer.weight": (hidden, 256)}
    for i in range(double):
        shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (FLUX_HEAD_DIM,)
    for i in range(single):
        shapes[f"single_blocks.{i}.linear1.weight"] = (hidden * 3 + hidden * 4, hidden)
    return shapes


def _flux2_shapes(hidden: int, context: int, double: int, single: int) -> dict:
    """Flux.2: Flux's keys plus the shared stream modulation; img_in reads 128 latent channels at patch 1."""
    shapes = {"img_in.weight": (hidden, 128), "txt_in.weight": (hidden, context),
              "double_stream_modulation_img.lin.weight": (6 * hidden, hidden)}
    for i in range(double):
        shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (FLUX_HEAD_DIM,)
    for i in range(single):  # q, k, v and the SwiGLU's two 3 x hidden halves
        shapes[f"single_blocks.{i}.linear1.weight"] = (hidden * 3 + hidden * 6, hidden)
    return shapes


def _sd35_shapes(depth: int) -> dict:
    hidden = 64 * depth  # ComfyUI reads the MMDiT depth as x_embedder width // 64
    return {"x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (2 * 2 * 16, hidden),
            "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
            "pos_embed": (1, 32 * 32, hidden), "joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
            "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
            "joint_blocks.0.x_block.attn2.qkv.weight": (3 * hidden, hidden)}


def _krea2_shapes(features: int, heads: int, layers: int, text_layers: int, text_dim: int) -> dict:
    """Krea 2: heads and KV heads are wq / wk rows // 128; the text stack's depth and width are read too."""
    shapes = {"first.weight": (features, 16 * 2 * 2), "txtfusion.projector.weight": (1, text_layers),
              "txtfusion.layerwise_blocks.0.prenorm.scale": (text_dim,)}
    for i in range(layers):
        shapes[f"blocks.{i}.attn.wq.weight"] = (heads * 128, features)
        shapes[f"blocks.{i}.attn.wk.weight"] = (heads * 128, features)
    return shapes


def _zimage_shapes(layers: int, text_dim: int) -> dict:
    """Z-Image: Lumina 2's keys at dim 3840 (the width that picks Z-Image), with the pad token real files carry."""
    shapes = {"cap_embedder.1.weight": (3840, text_dim), "noise_refiner.0.attention.k_norm.weight": (128,),
              "cap_pad_token": (1, 3840)}
    for i in range(layers):
        shapes[f"layers.{i}.attention.qkv.weight"] = (3 * 3840, 3840)
    return shapes


def _qwen_image_shapes(layers: int) -> dict:
    shapes = {"txt_norm.weight": (3584,), "img_in.weight": (3072, 16 * 2 * 2), "proj_out.weight": (16 * 2 * 2, 3072)}
    for i in range(layers):
        shapes[f"transformer_blocks.{i}.attn.to_q.weight"] = (3072, 3072)
    return shapes


def _wan_shapes(dim: int, ffn: int, layers: int, channels: int) -> dict:
    """Wan: heads = dim // 128; ``head.head`` has out channels x the 1x2x2 patch rows (48 out: Wan 2.2 5B)."""
    shapes = {"head.modulation": (1, 2, dim), "head.head.weight": (channels * 4, dim),
              "patch_embedding.weight": (dim, channels, 1, 2, 2)}
    for i in range(layers):
        shapes[f"blocks.{i}.ffn.0.weight"] = (ffn, dim)
    return shapes


_FLUX_ROLES = ((r"double_blocks\.\d+\.(img|txt)_attn\.qkv", "qkv"), (r"double_blocks\.\d+\.(img|txt)_attn\.proj", "to_out"),
               (r"single_blocks\.\d+\.linear1", "qkv+mlp"), (r"single_blocks\.\d+\.linear2", "out+mlp"))
_FLUX_CLASSES = ("comfy.ldm.flux.layers.SelfAttention", "comfy.ldm.flux.layers.SingleStreamBlock")
_WAN_ROLES = tuple((rf"blocks\.\d+\.(self_attn|cross_attn)\.{name}", role)
                   for name, role in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out")))

FLUX = DitFamily("flux", "diffusion_models/lorarar-synthetic-flux.safetensors", "Flux", hidden_size=256, heads=2,
                 latent_channels=16, context_dim=4096, pooled_dim=768, guidance=True,
                 detection_shapes=_flux_shapes(256, double=2, single=2),
                 config={"hidden_size": 256, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                         "context_in_dim": 4096, "vec_in_dim": 768, "guidance_embed": True},
                 roles=_FLUX_ROLES, attention_classes=_FLUX_CLASSES,
                 # 2 double blocks x 8 (img/txt qkv, proj, mlp.0, mlp.2) + 2 single blocks x 2 (linear1, linear2)
                 trained_linears=2 * 8 + 2 * 2, recorded=("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj"))
SD35 = DitFamily("sd35", "diffusion_models/lorarar-synthetic-sd35.safetensors", "SD3", hidden_size=128, heads=2,
                 latent_channels=16, context_dim=4096, pooled_dim=2048, guidance=False,
                 detection_shapes=_sd35_shapes(depth=2),
                 config={"depth": 2, "in_channels": 16, "adm_in_channels": 2048, "x_block_self_attn_layers": [0]},
                 roles=((r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.qkv", "qkv"),
                        (r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.proj", "to_out")),
                 attention_classes=("comfy.ldm.modules.diffusionmodules.mmdit.SelfAttention",),
                 # block 0: 6 x_block (attn, attn2, mlp) + 4 context_block; block 1 (the last, whose context side
                 # only feeds keys and values): 4 x_block + the context qkv
                 trained_linears=6 + 4 + 4 + 1,
                 recorded=("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj"))
FLUX2 = DitFamily("flux2", "diffusion_models/lorarar-synthetic-flux2.safetensors", "Flux2", hidden_size=128, heads=1,
                  latent_channels=128, context_dim=7680, pooled_dim=None, guidance=False,
                  detection_shapes=_flux2_shapes(128, 7680, double=1, single=1), vae="taef2",
                  config={"hidden_size": 128, "num_heads": 1, "depth": 1, "depth_single_blocks": 1,
                          "context_in_dim": 7680, "in_channels": 128, "patch_size": 1, "guidance_embed": False},
                  roles=_FLUX_ROLES, attention_classes=_FLUX_CLASSES, trained_linears=8 + 2,  # 1 double, 1 single
                  recorded=("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj"))
KREA2 = DitFamily("krea2", "diffusion_models/lorarar-synthetic-krea2.safetensors", "Krea2", hidden_size=128, heads=1,
                  latent_channels=16, context_dim=12 * 40, pooled_dim=None, guidance=False,
                  detection_shapes=_krea2_shapes(128, heads=1, layers=1, text_layers=12, text_dim=40),
                  config={"features": 128, "heads": 1, "kvheads": 1, "layers": 1, "txtlayers": 12, "txtdim": 40},
                  frames=1, vae=WAN21_VAE_NAME,
                  roles=((r".*\.attn\.wq", "to_q"), (r".*\.attn\.wk", "to_k"), (r".*\.attn\.wv", "to_v"),
                         (r".*\.attn\.wo", "to_out")),
                  attention_classes=("comfy.ldm.krea2.model.Attention",),
                  trained_linears=8, recorded=("blocks.0.attn.wq", "blocks.0.attn.wo"))  # wq wk wv gate wo + 3 MLP
ZIMAGE = DitFamily("zimage", "diffusion_models/lorarar-synthetic-zimage.safetensors", "ZImage", hidden_size=3840,
                   heads=30, latent_channels=16, context_dim=2560, pooled_dim=None, guidance=False,
                   detection_shapes=_zimage_shapes(layers=1, text_dim=2560), dtype="float16",
                   config={"dim": 3840, "n_heads": 30, "n_layers": 1, "cap_feat_dim": 2560, "in_channels": 16},
                   roles=((r".*\.attention\.qkv", "qkv"), (r".*\.attention\.out", "to_out")),
                   attention_classes=("comfy.ldm.lumina.model.JointAttention",),
                   # 5 blocks (1 layer, 2 + 2 refiners) x (qkv, out, w1 w2 w3)
                   trained_linears=5 * 5, recorded=("layers.0.attention.qkv", "layers.0.attention.out"))
QWEN_IMAGE = DitFamily("qwen_image", "diffusion_models/lorarar-synthetic-qwen-image.safetensors", "QwenImage",
                       hidden_size=3072, heads=24, latent_channels=16, context_dim=3584, pooled_dim=None,
                       guidance=False, detection_shapes=_qwen_image_shapes(layers=1), frames=1,
                       vae=WAN21_VAE_NAME, dtype="float16", config={"num_layers": 1, "in_channels": 64},
                       roles=((r"transformer_blocks\.\d+\.attn\.(to_q|add_q_proj)", "to_q"),
                              (r"transformer_blocks\.\d+\.attn\.(to_k|add_k_proj)", "to_k"),
                              (r"transformer_blocks\.\d+\.attn\.(to_v|add_v_proj)", "to_v"),
                              (r"transformer_blocks\.\d+\.attn\.(to_out\.0|to_add_out)", "to_out")),
                       attention_classes=("comfy.ldm.qwen_image.model.Attention",),
                       trained_linears=12,  # 8 attention (both streams) + 4 MLP
                       recorded=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out"))
WAN21 = DitFamily("wan21", "diffusion_models/lorarar-synthetic-wan21.safetensors", "WAN21_T2V", hidden_size=128,
                  heads=1, latent_channels=16, context_dim=4096, pooled_dim=None, guidance=False,
                  detection_shapes=_wan_shapes(128, ffn=256, layers=1, channels=16), frames=2, vae=WAN21_VAE_NAME,
                  config={"dim": 128, "num_heads": 1, "ffn_dim": 256, "num_layers": 1, "in_dim": 16, "out_dim": 16},
                  roles=_WAN_ROLES, attention_classes=("comfy.ldm.wan.model.WanSelfAttention",),
                  trained_linears=10,  # self and cross q k v o + 2 FFN
                  recorded=("blocks.0.self_attn.q", "blocks.0.cross_attn.o"))
WAN22 = DitFamily("wan22", "diffusion_models/lorarar-synthetic-wan22.safetensors", "WAN22_T2V", hidden_size=128,
                  heads=1, latent_channels=48, context_dim=4096, pooled_dim=None, guidance=False,
                  detection_shapes=_wan_shapes(128, ffn=256, layers=1, channels=48), frames=2, vae=LIGHTTAEW22_NAME,
                  config={"dim": 128, "num_heads": 1, "ffn_dim": 256, "num_layers": 1, "in_dim": 48, "out_dim": 48},
                  roles=_WAN_ROLES, attention_classes=("comfy.ldm.wan.model.WanSelfAttention",), trained_linears=10,
                  recorded=("blocks.0.self_attn.k", "blocks.0.cross_attn.o"))

# The families the CLI's --base any tests and the compare-conditioning test run on (they iterate this); ALL_FAMILIES
# adds the rest: the roles, merge, K-LoRA, compare and synthetic-model tests run on every one a host loads.
FAMILIES = {family.name: family for family in (FLUX, SD35)}
ALL_FAMILIES = {family.name: family for family in (FLUX, SD35, FLUX2, KREA2, ZIMAGE, QWEN_IMAGE, WAN21, WAN22)}

# The families each tested host has a supported-model class for (tests/host/test_synthetic_dit.py checks this
# against comfy.supported_models): ComfyUI 0.3.75 has no Krea2.
FAMILIES_BY_HOST = {"0.33.0": tuple(ALL_FAMILIES), "0.3.75": tuple(n for n in ALL_FAMILIES if n != "krea2")}


def host_lacks(family: DitFamily, version: str) -> str | None:
    """Why ComfyUI ``version`` cannot load ``family`` ("ComfyUI 0.3.75 has no Krea2"), or None when it can."""
    if family.name in FAMILIES_BY_HOST.get(version, tuple(ALL_FAMILIES)):
        return None
    return f"ComfyUI {version} has no {family.model_class}"


def vae_lacks(family: DitFamily, version: str) -> str | None:
    """Why ComfyUI ``version``'s VAELoader cannot load ``family``'s VAE, or None when it can."""
    if family.vae in VAES_BY_HOST.get(version, tuple(VAES)):
        return None
    return f"ComfyUI {version}'s VAELoader has no {family.vae} ({family.name} latents)"


def _recipe_of(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(_METADATA)
    except Exception:  # safetensors raises its own error type: a missing, truncated or foreign file counts as missing
        return None


def _wanted(families) -> list[str]:
    """Family names (None: FAMILIES) and the VAEs the host loads for them, in build order; unknown names refused.

    A VAE the host's VAELoader cannot load is left out: built by that host it could take another layout (0.3.75's
    TAESD has no Flux.2 variant) that another host would then read as its own.
    """
    names = list(FAMILIES if families is None else families)
    unknown = [name for name in names if name not in ALL_FAMILIES]
    if unknown:
        raise ValueError(f"unknown synthetic DiT families {unknown}; known: {', '.join(ALL_FAMILIES)}")
    loadable = VAES_BY_HOST.get(comfy_version(), tuple(VAES))
    vaes = [name for name in loadable if any(ALL_FAMILIES[family].vae == name for family in names)]
    return vaes + names


def missing(root: str | os.PathLike | None = None, families=None) -> list[str]:
    """Names of the families (default FAMILIES) and of their VAEs whose files ensure_dit() would (re)build."""
    root = Path(root or default_dir())
    out = []
    for name in _wanted(families):
        if name in VAES:
            stale = any(_recipe_of(root / rel) != str(VAES[name].recipe) for rel in VAES[name].files)
        else:
            stale = _recipe_of(ALL_FAMILIES[name].path(root)) != str(ALL_FAMILIES[name].recipe)
        if stale:
            out.append(name)
    return out


def ensure_dit(dir: str | os.PathLike | None = None, *, families=None, in_process: bool = False,
               timeout: float = 600) -> Path:
    """Build whatever file of ``families`` (default FAMILIES) and their VAEs is missing; return the root (absolute)."""
    root = Path(dir or default_dir()).resolve()
    if not missing(root, families):
        return root
    if in_process:
        build(root, families=families)
        return root
    cmd = [str(host_python()), str(Path(__file__).resolve()), "--dir", str(root)]
    for name in FAMILIES if families is None else families:
        cmd += ["--family", name]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0 or missing(root, families):
        raise RuntimeError(f"building synthetic DiT models failed (rc={proc.returncode}): "
                           f"{' '.join(cmd)}\n{proc.stdout[-6000:]}")
    return root


# --------------------------------------------------------------------------------------------
# Build (needs torch + comfy)
# --------------------------------------------------------------------------------------------

def host_config(family: DitFamily) -> dict:
    """The model config the running host's detection derives from the family's detection tensors.

    Flux and Flux.2: hosts up to 0.3.75 hard-code 24 (48) heads whatever the width; the heads are set here
    from the width (hidden // 128, what 0.33.0's detection computes) so the tiny model is consistent.
    """
    import torch

    import comfy.model_detection

    probe = {name: torch.empty(shape, device="meta") for name, shape in family.detection_shapes.items()}
    config = comfy.model_detection.detect_unet_config(probe, "")
    if family.name in _FLUX_LAYOUT:
        config["num_heads"] = config["hidden_size"] // FLUX_HEAD_DIM
    return config


def _disk_name(family: DitFamily, model_key: str) -> str:
    """Model parameter name -> the name in a released file (BFL files write Flux norm gains as ``.scale``)."""
    if family.name in _FLUX_LAYOUT and model_key.endswith("_norm.weight"):
        return model_key[:-len(".weight")] + ".scale"
    return model_key


def _check_host_has(family: DitFamily) -> None:
    import comfy.supported_models

    if not hasattr(comfy.supported_models, family.model_class):
        raise RuntimeError(f"ComfyUI {comfy_version()} has no {family.model_class}: build {family.name} with a host "
                           "that has it (devkit/synthetic_dit.py FAMILIES_BY_HOST)")


def build_state_dict(family: DitFamily, seed: int = SEED) -> dict:
    """Random float16 weights of the family's tiny model, keyed as in a released diffusion-model file."""
    import torch

    import comfy.model_detection

    _check_host_has(family)
    model_config = comfy.model_detection.model_config_from_unet_config(host_config(family))
    if type(model_config).__name__ != family.model_class:
        raise RuntimeError(f"{family.name}: config matched {type(model_config).__name__}, expected {family.model_class}")
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, device="meta")
    shapes = {_disk_name(family, k): v for k, v in model.diffusion_model.state_dict().items()}
    ordered = {k: shapes[k] for k in sorted(shapes)}  # the same tensors whichever host builds
    state = randomize(ordered, torch.Generator().manual_seed(seed), torch.float16)
    for key in state:
        if key.endswith("_norm.scale"):  # RMS gains: ones, like randomize gives 1-dim ``*.weight``
            state[key] = torch.ones_like(state[key])
    return state


def _vae_model(vae: SyntheticVae):
    """The host's own module for ``vae`` (on the meta device: only its parameter shapes are used)."""
    import torch

    import comfy.taesd.taesd

    with torch.device("meta"):
        if vae.name in ("taesd3", "taef2"):  # 128 channels make TAESD its Flux.2 variant
            return comfy.taesd.taesd.TAESD(latent_channels=vae.latent_channels)
        if vae.name == WAN21_VAE_NAME:
            import comfy.ldm.wan.vae

            return comfy.ldm.wan.vae.WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                            attn_scales=[], temperal_downsample=[False, True, True])
        import comfy.taesd.taehv

        return comfy.taesd.taehv.TAEHV(latent_channels=vae.latent_channels)


def build_vae(vae: SyntheticVae, root: Path, seed: int = SEED) -> list[str]:
    """Write ``vae``'s random float16 files (the host's layout); returns their paths under the root.

    Drawn in the module's own parameter order: recipe 1 of taesd3 was, and its cached files must stay the same.
    """
    import torch

    state = randomize(_vae_model(vae).state_dict(), torch.Generator().manual_seed(seed), torch.float16)
    for key in state:
        if key.endswith(".gamma"):  # Wan's RMS norm gains are (C, 1, 1[, 1]): ones, not a random conv-like init
            state[key] = torch.ones_like(state[key])
    for rel, prefix in vae.files.items():
        save_atomic({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, root / rel,
                     {_METADATA: str(vae.recipe)})
    return list(vae.files)


def build(root: str | os.PathLike | None = None, force: bool = False, families=None) -> dict:
    """Build the missing files of ``families`` (default FAMILIES) and their VAEs (all of them with force=True).

    Returns {"root", "built": [paths], "seconds": {name: build seconds}}.
    """
    root = Path(root or default_dir()).resolve()
    with locked(root):
        todo = _wanted(families) if force else missing(root, families)
        report = {"root": str(root), "built": [], "seconds": {}}
        if not (root / ".gitignore").exists():
            (root / ".gitignore").write_text("*\n")
        if not todo:
            return report
        import_comfy()
        for name in todo:
            started = time.perf_counter()
            if name in VAES:
                report["built"] += build_vae(VAES[name], root)
            else:
                family = ALL_FAMILIES[name]
                save_atomic(build_state_dict(family), family.path(root), {_METADATA: str(family.recipe),
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


def load_patcher(family: DitFamily, root: str | os.PathLike | None = None, dtype: str | None = None):
    """(ModelPatcher, how) for the saved model on the CPU, its weights in ``dtype`` (default ``family.dtype``).

    float16 weights (Z-Image, Qwen-Image) are cast layer by layer to the compute dtype the host picks for the
    device, as ComfyUI does for any float16 file; float32 is the exact reference the LoRA tests compare with.

    ``how`` is "load_diffusion_model_state_dict" when ComfyUI's own loader builds it from the file. On
    hosts whose detection cannot build the tiny model (Flux and Flux.2 on 0.3.75: 24 / 48 heads are
    hard-coded, so only a full-width model loads) it is "detected config, heads from width": the same
    detection, the same supported-model class, with num_heads corrected as host_config() does, then
    ComfyUI's own model-config loading steps.
    """
    import torch

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    weight_dtype = getattr(torch, dtype or family.dtype)
    state = comfy.utils.load_torch_file(str(family.path(root)))
    detected = comfy.model_detection.detect_unet_config(state, "")
    if family.name not in _FLUX_LAYOUT or detected["num_heads"] * FLUX_HEAD_DIM == detected["hidden_size"]:
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": weight_dtype})
        return patcher, "load_diffusion_model_state_dict"
    model_config = comfy.model_detection.model_config_from_unet_config(host_config(family), state)
    device = comfy.model_management.get_torch_device()
    model_config.set_inference_dtype(weight_dtype, comfy.model_management.unet_manual_cast(
        weight_dtype, device, model_config.supported_inference_dtypes))
    model = model_config.get_model(state, "")
    model.load_model_weights(model_config.process_unet_state_dict(state), "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, "detected config, heads from width"


def conditioning(family: DitFamily, *, batch: int = 1, tokens: int = 8, seed: int = 0) -> list:
    """A ComfyUI CONDITIONING for the family, built directly (the real text encoders are gigabytes).

    [[cross_attn (batch, tokens, context_dim), {"pooled_output": (batch, pooled_dim), "guidance": 3.5}]]
    with pooled_output None where the family takes no pooled vector and guidance only for Flux dev. The same tensors
    as the test node LoraRarTestConditioning gives for the family's model with the same seed.
    """
    from devkit.comfy_nodes.lorarar_test_nodes import random_conditioning

    return random_conditioning(family.context_dim, family.pooled_dim, family.guidance, batch=batch, tokens=tokens,
                               seed=seed)


def sample_step(patcher, family: DitFamily, *, size: int = 16, seed: int = 0):
    """One euler step of comfy.sample.sample on an empty ``family.latent_shape(size)`` latent; returns the latent."""
    import torch

    import comfy.sample

    latent = torch.zeros(family.latent_shape(size))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = conditioning(family, seed=seed), conditioning(family, seed=seed + 1)
    return comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def host_families() -> list[str]:
    """The families of ALL_FAMILIES the running host has a supported-model class for (comfy imported)."""
    import comfy.supported_models

    return [name for name, family in ALL_FAMILIES.items() if hasattr(comfy.supported_models, family.model_class)]


def verify(root: str | os.PathLike | None = None, families=None) -> dict:
    """Per family (default: the host's): detected class, config, file MiB, load and one-step seconds."""
    import_comfy()
    root = Path(root or default_dir())
    out = {}
    for name in families or host_families():
        family = ALL_FAMILIES[name]
        started = time.perf_counter()
        patcher, how = load_patcher(family, root)
        loaded = time.perf_counter()
        result = sample_step(patcher, family)
        config = patcher.model.model_config.unet_config
        out[name] = {"detected_class": detected_class(family, root), "loaded_via": how, "dtype": family.dtype,
                     "params_m": round(sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6, 2),
                     "mib": round(family.path(root).stat().st_size / 2**20, 2),
                     "config": {k: config.get(k) for k in family.config},
                     "step_shape": list(result.shape), "step_finite": bool(result.isfinite().all()),
                     "load_s": round(loaded - started, 2), "step_s": round(time.perf_counter() - loaded, 2)}
        del patcher
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help=f"models root (default {default_dir()})")
    parser.add_argument("--family", action="append", choices=list(ALL_FAMILIES),
                        help="build this family and its VAE (repeat; default: every family the host has)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--verify", action="store_true", help="load each model with comfy and run one step")
    args = parser.parse_args(argv)
    root = Path(args.dir or default_dir()).resolve()
    if not args.family:
        import_comfy()
    families = args.family or host_families()
    report = build(root, force=args.force, families=families)
    print(f"built {report['built']} in {report['seconds']} s" if report["built"] else f"all cached under {root}")
    for name in _wanted(families):
        files = VAES[name].files if name in VAES else [ALL_FAMILIES[name].file]
        print(f"  {name}: {sum((root / rel).stat().st_size for rel in files) / 2**20:.2f} MiB")
    if args.verify:
        print(json.dumps(verify(root, families), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
