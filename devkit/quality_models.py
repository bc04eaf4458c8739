"""The quality lab's models, trained here on the world of devkit/quality_world.py (bench/quality_lab.py runs them).

- An autoencoder in ComfyUI's TAESD layout (``comfy.taesd.taesd.TAESD``): its encoder written (standardised 8x8
  patch means, ``written_encoder``), its decoder trained on renders of every concept. An image codec, as SD's VAE is,
  so the concepts the diffusion model must learn stay in the diffusion model.
- A diffusion model of a family ComfyUI's detection accepts (``Family``; ``SD15``: one level of width 320, three
  transformer blocks), trained from scratch with the pack's adapter (ComfyUI's own noising, ``apply_model`` and
  target for the model's prediction type) on the base concepts.
- A text encoder ComfyUI loads: SD 1.5's CLIP-L (its config is fixed), random and frozen; it only has to give
  different prompts different encodings.
- LoRAs on the diffusion model's attention projections, written in kohya's format with the ``lora_unet_`` names ComfyUI's own
  key map gives SD 1.5's diffusers layout (``comfy.lora.model_lora_keys_unet``).

Every function takes ComfyUI objects (ModelPatcher, CLIP, VAE) loaded by ComfyUI's own checkpoint loader, and the
pack's adapter module ``sampling`` (nodes/adapter/sampling.py as ComfyUI loaded it), so this file needs the host
python with ComfyUI importable (devkit/comfy_server.in_process_host).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from devkit.synthetic_models import randomize, save_atomic

@dataclass(frozen=True)
class Family:
    """A model family the lab builds: its diffusion model's config as ComfyUI's detection must read it back, the
    class detection must name, and the latent scale the model applies to VAE latents."""

    name: str
    unet_config: dict
    model_class: str
    latent_scale: float


# SD15 matches on width 320 and a 768-wide context, so only the depth can shrink: one level, one res block and one
# transformer block per block, three transformer blocks in all (24 attention linears).
SD15 = Family("sd15", {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1], "channel_mult": [1],
    "transformer_depth_middle": -2,  # no middle block
    "use_linear_in_transformer": False, "context_dim": 768, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}, "SD15", 0.18215)  # comfy.latent_formats.SD15.scale_factor
FAMILIES = {family.name: family for family in (SD15,)}  # the DiT hypernet issue adds a tiny Flux.2-class family
TOKEN_EMBEDDING_STD = 2.0
ATTENTION_SUFFIXES = (".to_q", ".to_k", ".to_v", ".to_out.0")
Log = Callable[[str], None]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> ComfyUI IMAGE float (N, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0


# ---- the autoencoder ------------------------------------------------------------------------------------------
# The encoder is written, not trained: TAESD's encoder has no normalisation, so its convolutions can be set to take the
# mean of each 8x8 patch of R, G, B and of max(0, luminance - 0.5) (how much of the patch is bright), standardised
# per channel. The latent is then an exact 8x8 thumbnail of a 64 px render, and only the decoder learns (super-
# resolution with this world's shapes and patterns as its prior): a codec that trains in minutes on a CPU, where a
# learned 4-channel code did not (blurred blobs after 600 steps).

def written_encoder(encoder: torch.nn.Sequential, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
    """Set ``encoder`` (comfy.taesd.taesd.Encoder) to standardised 8x8 patch means (block comment above)."""
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
        first, last = encoder[0], encoder[-1]
        for channel in range(3):
            first.weight[channel, channel, 1, 1] = 1.0
        first.weight[3, :, 1, 1] = torch.tensor([0.299, 0.587, 0.114])
        first.bias[3] = -0.5  # the next block's ReLU keeps max(0, luminance - 0.5)
        for layer in encoder:
            if isinstance(layer, torch.nn.Conv2d) and layer.stride == (2, 2):
                for channel in range(4):  # taps 1..2 of a 3x3 stride-2 kernel cover exactly pixels 2i, 2i+1: no padding
                    layer.weight[channel, channel, 1:3, 1:3] = 0.25
        for block in encoder:  # a block whose residual branch ends in zeros is relu(x): x here (x >= 0)
            if hasattr(block, "skip"):
                block.conv[-1].weight.zero_()
        mean = torch.zeros(4) if mean is None else mean
        std = torch.ones(4) if std is None else std
        for channel in range(4):
            last.weight[channel, channel, 1, 1] = 1.0 / std[channel]
            last.bias[channel] = -mean[channel] / std[channel]


def train_autoencoder(draw: Callable[[int, int], np.ndarray], steps: int, batch: int, seed: int, log: Log,
                      family: Family = SD15) -> dict:
    """ComfyUI's TAESD with the written encoder and a decoder trained on ``draw(batch, step)`` (uint8 (N, 64, 64, 3)
    renders, 32 px crops on the 8 px grid: the encoder is exact per patch, so a crop's latent is the latent's crop);
    its state dict as ComfyUI holds it (``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``)."""
    import comfy.taesd.taesd as taesd

    torch.manual_seed(seed)
    model = taesd.TAESD(latent_channels=4)
    written_encoder(model.taesd_encoder)
    with torch.no_grad():
        raw = model.taesd_encoder(images_to_tensor(draw(256, steps)).permute(0, 3, 1, 2))  # a draw no step trains on
    written_encoder(model.taesd_encoder, raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3)).clamp_min(1e-3))
    model.taesd_encoder.requires_grad_(False)
    _init_plainly(model.taesd_decoder)
    optimiser = torch.optim.Adam(model.taesd_decoder.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=max(steps, 2), pct_start=0.1)
    generator, started = torch.Generator().manual_seed(seed), time.perf_counter()
    for step in range(steps):
        pixels = images_to_tensor(draw(batch, step)).permute(0, 3, 1, 2)
        top, left = (torch.randint(0, (pixels.shape[-1] - 32) // 8 + 1, (2,), generator=generator) * 8).tolist()
        pixels = pixels[:, :, top:top + 32, left:left + 32]
        with torch.no_grad():
            latent = model.taesd_encoder(pixels)
        loss = (model.taesd_decoder(latent) - pixels).abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.taesd_decoder.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"autoencoder step {step + 1}/{steps}: L1 {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # ComfyUI: latent = raw / vae_scale + vae_shift, then the model multiplies by its latent scale: raw is standardised
    state["vae_scale"] = torch.tensor(family.latent_scale)
    state["vae_shift"] = torch.tensor(0.0)
    return state


def _init_plainly(model: torch.nn.Module) -> None:
    """PyTorch's default init for every conv (comfy's ops skip it, leaving memory as it was); each residual block's
    last conv starts small, so the unnormalised stack of blocks starts near the identity."""
    import comfy.taesd.taesd as taesd

    for child in model.modules():
        if isinstance(child, (torch.nn.Conv2d, torch.nn.Linear)):
            _reset(child)
        if isinstance(child, taesd.Block):
            child.conv[-1].weight.data.mul_(0.1)


def _reset(layer: torch.nn.Module) -> None:
    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        fan_in = layer.weight[0].numel()
        torch.nn.init.uniform_(layer.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


# ---- the checkpoint -------------------------------------------------------------------------------------------

def initial_checkpoint(path: Path, autoencoder: dict, seed: int, family: Family = SD15) -> None:
    """A checkpoint of ``family`` ComfyUI's CheckpointLoaderSimple loads: the untrained diffusion model
    (output convolutions zero, as diffusion UNets start), a random CLIP-L and ``autoencoder``."""
    import comfy.model_detection
    import comfy.sd1_clip

    model_config = comfy.model_detection.model_config_from_unet_config(dict(family.unet_config))
    if type(model_config).__name__ != family.model_class:
        raise RuntimeError(f"{family.name}'s config matched {type(model_config).__name__}, expected {family.model_class}")
    generator = torch.Generator().manual_seed(seed)
    unet = randomize(model_config.get_model({}, device="meta").diffusion_model.state_dict(), generator, torch.float32)
    for key in unet:
        if key.startswith("out.2.") or ".out_layers.3." in key or ".proj_out." in key:
            unet[key].zero_()
    clip = randomize(comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16).state_dict(), generator,
                     torch.float16)
    # Token embeddings drawn large, so each word of a prompt stays visible at its position through the random layers
    # (at the default scale the 12 random layers' shared output dominates and two prompts' encodings align to 0.99).
    token = next(key for key in clip if key.endswith("token_embedding.weight"))
    clip[token] = (torch.randn(clip[token].shape, generator=generator) * TOKEN_EMBEDDING_STD).half()
    save_checkpoint(path, model_config, unet, clip, autoencoder, {"lorarar_quality_lab": f"initial {family.name}"})


def save_checkpoint(path: Path, model_config, unet: dict, clip: dict, autoencoder: dict, metadata: dict) -> None:
    """One .safetensors in SD 1.5's checkpoint layout, through the model config's own key conversions."""
    state = model_config.process_unet_state_dict_for_saving(dict(unet))
    state.update(model_config.process_clip_state_dict_for_saving(dict(clip)))
    state.update(model_config.process_vae_state_dict_for_saving(dict(autoencoder)))
    save_atomic(state, path, metadata)


def load_checkpoint(path: Path, family: Family = SD15):
    """(MODEL, CLIP, VAE) as the stock CheckpointLoaderSimple gives them (ComfyUI's detection included)."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    # frozen unless a loop says otherwise: a LoRA's backward must not compute the base weights' gradients
    for module in (model.model, clip.cond_stage_model, vae.first_stage_model):
        module.requires_grad_(False)
    found = type(model.model.model_config).__name__
    if found != family.model_class:
        raise RuntimeError(f"{path}: ComfyUI detected {found}, expected {family.model_class}")
    return model, clip, vae


def parts_of(model, clip, vae) -> tuple[dict, dict, dict]:
    """(UNet, CLIP, VAE) state dicts of loaded objects, in the form save_checkpoint takes."""
    unet = {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    clip_sd = dict(clip.get_sd())
    return unet, clip_sd, vae.get_sd()


# ---- encoded training data ------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Training examples: latents (N, 4, h, w) as VAEEncode gives them and, per example, the index of its caption
    in ``conditions`` (apply_model keyword tensors of batch 1, one dict per caption; index 0: the empty prompt)."""

    latents: torch.Tensor
    caption_index: torch.Tensor
    conditions: list[dict]

    def batch(self, rows: torch.Tensor, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(latents, apply_model keywords) of ``rows``; ``drop`` (bool per row) swaps in the empty prompt."""
        index = self.caption_index[rows].clone()
        if drop is not None:
            index[drop] = 0
        keys = self.conditions[0].keys()
        return self.latents[rows], {k: torch.cat([self.conditions[i][k] for i in index.tolist()]) for k in keys}


def encode(sampling, model, clip, vae, images: np.ndarray, captions: list[str]) -> Encoded:
    """Images (uint8 (N, H, W, 3)) and their captions through the stock VAEEncode and CLIPTextEncode."""
    with torch.no_grad():
        latents = torch.cat([sampling.encode_images(vae, images_to_tensor(images[i:i + 64]))
                             for i in range(0, len(images), 64)])
        texts = ["", *sorted(set(captions))]
        conditions = [sampling.model_conditioning(model, sampling.encode_text(clip, text), latents[:1]) for text in texts]
    index = torch.tensor([texts.index(caption) for caption in captions])
    return Encoded(latents, index, [{k: v.detach().float() for k, v in c.items()} for c in conditions])


# ---- training loops -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    learning_rate: float
    seed: int
    drop_prompt: float = 0.1  # the empty prompt this often, so classifier-free guidance has an unconditional model


def diffusion_loss(sampling, model, data: Encoded, rows: torch.Tensor, generator: torch.Generator,
                   drop_prompt: float) -> torch.Tensor:
    """The eps objective through ComfyUI's own noising and apply_model (the pack's adapter), on ``rows``."""
    drop = torch.rand(len(rows), generator=generator) < drop_prompt
    latents, conditioning = data.batch(rows, drop)
    noise = torch.randn(latents.shape, generator=generator)
    timestep = torch.randint(0, sampling.timestep_count(model), (len(rows),), generator=generator)
    batch = sampling.noised_batch(model, latents, noise, timestep, conditioning)
    return torch.nn.functional.mse_loss(sampling.prediction(model, batch), sampling.target(model, batch))


def train_base(sampling, model, data: Encoded, schedule: Schedule, log: Log) -> dict:
    """Train the UNet of ``model`` from its current weights; returns the EMA weights (the ones sampled)."""
    unet = sampling.trainable(model).model.diffusion_model
    unet.train()
    for parameter in unet.parameters():
        parameter.requires_grad_(True)
    ema = copy.deepcopy(unet.state_dict())
    optimiser = torch.optim.AdamW(unet.parameters(), lr=schedule.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(schedule.seed)
    started, decay = time.perf_counter(), 0.995
    for step in range(schedule.steps):
        warm = min(1.0, (step + 1) / 50)
        for group in optimiser.param_groups:
            group["lr"] = schedule.learning_rate * warm
        rows = torch.randint(0, len(data.latents), (schedule.batch,), generator=generator)
        loss = diffusion_loss(sampling, model, data, rows, generator, schedule.drop_prompt)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        with torch.no_grad():
            rate = min(decay, (1 + step) / (10 + step))
            for key, value in unet.state_dict().items():
                ema[key].mul_(rate).add_(value.detach(), alpha=1 - rate)
        if step % 50 == 0 or step == schedule.steps - 1:
            log(f"base step {step + 1}/{schedule.steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    unet.eval()
    unet.requires_grad_(False)
    unet.load_state_dict(ema)
    return {k: v.detach().clone() for k, v in ema.items()}


class LoraBranches:
    """Rank-r branches on the UNet's attention linears, added by forward hooks: out + up(down(x)) * alpha / rank."""

    def __init__(self, unet: torch.nn.Module, rank: int, generator: torch.Generator):
        self.rank, self.handles, self.factors = rank, [], {}
        for name, module in unet.named_modules():
            if not name.endswith(ATTENTION_SUFFIXES):
                continue
            down = torch.empty(rank, module.in_features)
            torch.nn.init.normal_(down, std=1 / math.sqrt(module.in_features), generator=generator)
            up = torch.zeros(module.out_features, rank)
            self.factors[name] = (down.requires_grad_(True), up.requires_grad_(True))
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def add_branch(module, inputs, output):
            down, up = self.factors[name]
            return output + (inputs[0].to(down.dtype) @ down.T) @ up.T
        return add_branch

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def kohya(self, key_names: dict[str, str]) -> dict[str, torch.Tensor]:
        """The branches as a kohya state dict (alpha = rank, so the file's scale is 1)."""
        state = {}
        for name, (down, up) in self.factors.items():
            stem = key_names[name]
            state[f"{stem}.lora_down.weight"] = down.detach().clone().contiguous()
            state[f"{stem}.lora_up.weight"] = up.detach().clone().contiguous()
            state[f"{stem}.alpha"] = torch.tensor(float(self.rank))
        return state


def kohya_names(model) -> dict[str, str]:
    """UNet module name -> kohya ``lora_unet_`` stem in SD 1.5's diffusers naming, from ComfyUI's own key map."""
    import comfy.lora

    names = {}
    for key, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if key.startswith("lora_unet_") and "_blocks_" in key and target.endswith(".weight"):
            module = target[len("diffusion_model."):-len(".weight")]
            if module.endswith(ATTENTION_SUFFIXES) and ("down_blocks" in key or "up_blocks" in key or "mid_block" in key):
                names[module] = key
    return names


def train_lora(sampling, model, data: Encoded, rank: int, schedule: Schedule, log: Log, label: str) -> dict:
    """A LoRA of ``rank`` on every attention linear of the UNet, trained on ``data``; its kohya state dict."""
    unet = sampling.trainable(model).model.diffusion_model  # weights a sampler made inference tensors are copied
    generator = torch.Generator().manual_seed(schedule.seed)
    branches = LoraBranches(unet, rank, generator)
    optimiser = torch.optim.AdamW(branches.parameters(), lr=schedule.learning_rate, weight_decay=0.0)
    started = time.perf_counter()
    try:
        for step in range(schedule.steps):
            rows = torch.randint(0, len(data.latents), (schedule.batch,), generator=generator)
            loss = diffusion_loss(sampling, model, data, rows, generator, schedule.drop_prompt)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        log(f"LoRA {label}: {schedule.steps} steps, last loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        return branches.kohya(kohya_names(model))
    finally:
        branches.remove()


def unloaded_keys(model, state: dict) -> list[str]:
    """The attention linears of ``model`` that ComfyUI's own LoRA loader would not patch from ``state`` (kohya): a
    name the key map does not know is otherwise only a log line, and the LoRA silently does nothing there."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patched = comfy.lora.load_lora(state, key_map, log_missing=False)
    wanted = [f"diffusion_model.{name}.weight" for name, _ in model.model.diffusion_model.named_modules()
              if name.endswith(ATTENTION_SUFFIXES)]
    return [key for key in wanted if key not in patched]
