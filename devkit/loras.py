"""Random LoRAs of real base-model shapes, written in the file formats met in practice."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from hypernet.base_models import SDXL, UNetLayout
from hypernet.keys import _diffusers_to_sgm

# SD1.5's UNet: the same widths as SDXL's but a 768-wide text context, for "another base model" tests
SD15 = UNetLayout("sd15", (320, 640, 1280, 1280), (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0),
                  (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1), 1, context_dim=768)

FORMATS = ("kohya", "kohya-diffusers", "peft", "diffusers", "reference", "processor")


def _diffusers_module(sgm_module: str, layout: UNetLayout) -> str:
    """``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` -> ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``."""
    blocks, _ = _diffusers_to_sgm(layout)
    sgm_to_diffusers = {sgm: diffusers for diffusers, sgm in blocks.items()}
    parts = sgm_module.split(".")
    depth = 2 if parts[0] == "middle_block" else 3
    prefix = "_".join(parts[:depth])
    diffusers = sgm_to_diffusers[prefix].split("_")
    # down_blocks_1_attentions_0 -> down_blocks.1.attentions.0 ; mid_block_attentions_0 -> mid_block.attentions.0
    head = ".".join(["_".join(diffusers[:2]), *diffusers[2:]])
    return head + "." + ".".join(parts[depth:])


def lora_keys(sgm_module: str, fmt: str, layout: UNetLayout) -> tuple[str, str, str | None]:
    """(up key, down key, alpha key or None) for one attention projection in the given format."""
    if fmt == "kohya":
        stem = "lora_unet_" + sgm_module.replace(".", "_")
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    diffusers = _diffusers_module(sgm_module, layout)
    if fmt == "kohya-diffusers":
        stem = "lora_unet_" + diffusers.replace(".", "_")
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    if fmt == "peft":
        return f"unet.{diffusers}.lora_B.weight", f"unet.{diffusers}.lora_A.weight", None
    if fmt == "diffusers":
        return f"unet.{diffusers}.lora.up.weight", f"unet.{diffusers}.lora.down.weight", None
    if fmt == "reference":
        return f"unet.unet.{diffusers}.lora.up.weight", f"unet.unet.{diffusers}.lora.down.weight", None
    if fmt == "processor":
        stem = diffusers.replace(".to_out.0", ".to_out").replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor.")
        return f"unet.{stem}_lora.up.weight", f"unet.{stem}_lora.down.weight", None
    raise ValueError(fmt)


def random_lora(layout: UNetLayout = SDXL, rank: int = 8, seed: int = 0, fmt: str = "kohya", alpha: float | None = None,
                dtype: torch.dtype = torch.float32, modules: list[str] | None = None, conv: bool = False,
                std: float = 0.02) -> dict[str, torch.Tensor]:
    """A random attention LoRA state dict; ``modules`` limits it to some SGM module names."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for module, d_out, d_in in layout.attention_linears():
        if modules is not None and module not in modules:
            continue
        up_key, down_key, alpha_key = lora_keys(module, fmt, layout)
        up = torch.randn(d_out, rank, generator=generator) * std
        down = torch.randn(rank, d_in, generator=generator) * std
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        state_dict[up_key] = up.to(dtype)
        state_dict[down_key] = down.to(dtype)
        if alpha is not None and alpha_key is not None:
            state_dict[alpha_key] = torch.tensor(float(alpha))
    return state_dict


def write_lora(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path
