"""K-LoRA on DiT models (synthetic Flux and SD3.5): a fused-format subject and a split-format style, sampled by
ComfyUI's own sampler; every recorded call of a switched fused linear (q/k/v as one linear, and the attention
output projection) computes x @ (W + dW_choice)^T + b, with the choice the dense rule makes at that step."""

import re

import pytest
import torch
import torch.nn.functional as F

from devkit import synthetic_dit
from devkit.dense_rule import dense_k_lora_choice, dense_k_lora_gamma, dense_k_lora_scores
from devkit.dit_loras import dense_updates, random_dit_lora, write_lora
from devkit.synthetic_dit import FAMILIES

from tests.support.recording import recording_clone

pytestmark = pytest.mark.host

# the attention linears K-LoRA switches: fused q/k/v and the output projection of every attention
SWITCHED = {"flux": re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)\.weight$"),
            "sd35": re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)\.weight$")}
RECORDED = {"flux": ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj"),
            "sd35": ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj")}
SUBJECT_RANK, STYLE_RANK = 4, 3


def canonical(native: str) -> str:
    return "lora_unet_" + native.removesuffix(".weight").replace(".", "_")


@pytest.fixture(scope="module")
def models(comfy_host):
    root = synthetic_dit.ensure_dit(in_process=True)
    return {name: synthetic_dit.load_patcher(family, root)[0] for name, family in FAMILIES.items()}


def _sample(model, family, steps: int):
    """A real comfy.sample run recording every model call's (sigma, schedule) and the RECORDED linears' x and y."""
    import comfy.sample

    recording, calls, records, handles = recording_clone(model, RECORDED[family.name])
    latent = torch.zeros(1, family.latent_channels, 8, 8)
    try:
        comfy.sample.sample(recording, comfy.sample.prepare_noise(latent, 3), steps, 2.0, "euler", "normal",
                            synthetic_dit.conditioning(family, seed=1), synthetic_dit.conditioning(family, seed=2),
                            latent, disable_pbar=True, seed=3)
    finally:
        for handle in handles:
            handle.remove()
    return calls, records


def _progress(sigma: float, schedule: list[float]) -> float:
    index = min(range(len(schedule)), key=lambda i: abs(schedule[i] - sigma))
    assert abs(schedule[index] - sigma) <= 1e-6 * max(1.0, sigma)
    return index / (len(schedule) - 1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_k_lora_switches_fused_dit_attention_linears_per_step(comfy_host, models, name):
    import comfy.model_management

    nodes, _, loras = comfy_host
    family, model = FAMILIES[name], models[name]
    subject = random_dit_lora(family, "kohya", rank=SUBJECT_RANK, seed=21, alpha=2.0, std=0.1)
    style = random_dit_lora(family, "peft", rank=STYLE_RANK, seed=22, std=0.06)
    write_lora(loras / f"kd-{name}-subject.safetensors", subject)
    write_lora(loras / f"kd-{name}-style.safetensors", style)
    comfy.model_management.unload_all_models()
    originals = {m: (model.get_model_object(f"diffusion_model.{m}").weight.detach().clone(),
                     model.get_model_object(f"diffusion_model.{m}").bias.detach().clone()) for m in RECORDED[name]}
    model_out, _, merged, report = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, None, f"kd-{name}-subject.safetensors", f"kd-{name}-style.safetensors", 1.0, 1.0, 1.0, 1.0,
        "k-lora", "sum")
    dense_c = {k: v for k, v in dense_updates(family, "kohya", subject, dtype=torch.float64).items() if SWITCHED[name].match(k)}
    dense_s = dense_updates(family, "peft", style, dtype=torch.float64)
    assert set(merged.switch.layers) == {canonical(k) for k in dense_c}
    assert f"switched per sampling step: {len(dense_c)} layers" in report
    gamma = dense_k_lora_gamma([(dense_c[k], dense_s[k]) for k in dense_c])
    seen = set()
    calls, records = _sample(model_out, family, 4)
    for call, module, x, y in records:
        key = f"{module}.weight"
        # k = r_c * r_s of the layer as merged: a split style's q/k/v pieces make one layer of their summed rank
        k = merged.switch.layers[canonical(key)].subject.rank * merged.switch.layers[canonical(key)].style.rank
        side = dense_k_lora_choice(*dense_k_lora_scores(dense_c[key], dense_s[key], k), gamma,
                                   _progress(*calls[call]), "s*", 1.5, 1.275)
        weight, bias = originals[module]
        expected = F.linear(x.double(), weight.double() + (dense_c if side == "subject" else dense_s)[key], bias.double())
        error = float((y.double() - expected).norm() / expected.norm())
        assert error <= 1e-4, f"{module} at call {call}: relative error {error:.2e} against the {side} update"
        seen.add(side)
    assert records and seen == {"subject", "style"}, seen
    comfy.model_management.unload_all_models()
