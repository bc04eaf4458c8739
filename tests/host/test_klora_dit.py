"""K-LoRA and EST-LoRA on every DiT family the host loads (synthetic Flux, Flux.2, SD3.5, Krea 2, Z-Image, Qwen-Image, Wan 2.1
and 2.2): a kohya subject and a style in another trainer's form, sampled by ComfyUI's own sampler; every recorded
call of a switched linear (a query or fused q/k/v, and an output projection of the text stream or the
cross-attention) computes x @ (W + dW_choice)^T + b, with the choice the dense rule makes at that step (K-LoRA's
score: the top-k entries of each update; EST-LoRA's: its squared Frobenius norm)."""


import pytest
import torch
import torch.nn.functional as F

from devkit import synthetic_dit
from devkit.dense_rule import dense_k_lora_choice, dense_k_lora_gamma, dense_k_lora_scores
from devkit.dit_loras import FORMATS_BY_HOST, dense_updates, random_dit_lora, write_lora
from devkit.synthetic_dit import ALL_FAMILIES

from tests.conftest import host_version
from tests.support.families import WIDE_MODULES, canonical, is_switched, lora_modules
from tests.support.recording import recording_clone

pytestmark = pytest.mark.host

FAMILIES = {name: family for name, family in ALL_FAMILIES.items()
            if not synthetic_dit.host_lacks(family, host_version())}
# two switched linears per family whose inputs and outputs are recorded: each family entry's ``recorded``, a query
# (or fused q/k/v) and an output projection, from the text stream or the cross-attention where the family has one
SUBJECT_RANK, STYLE_RANK = 4, 3
# the style's strength per method: EST-LoRA compares squared norms, and at strength 1 this pair's subject (rank 4, std
# 0.1, alpha/rank 0.5) out-weighs the style (rank 3, std 0.06) at every s(p) <= 1.5, so the test would see one side
STYLE_STRENGTH = {"k-lora": 1.0, "est-lora": 1.5}


@pytest.fixture(scope="module")
def models(dit_float32):
    # float32: every recorded output is compared with a float64 golden (the patchers test_dit_merge used); the files
    # first, as the LoRAs are made from a family's file before its patcher is asked for
    synthetic_dit.ensure_dit(families=list(FAMILIES), in_process=True)
    return dit_float32


def _sample(model, family, steps: int, cfg: float):
    """A real comfy.sample run recording every model call's (sigma, schedule) and the family's recorded linears' x and y."""
    import comfy.sample

    recording, calls, records, handles = recording_clone(model, family.recorded)
    latent = torch.zeros(family.latent_shape(8))
    try:
        comfy.sample.sample(recording, comfy.sample.prepare_noise(latent, 3), steps, cfg, "euler", "normal",
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


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_k_lora_switches_fused_dit_attention_linears_per_step(comfy_host, models, name, method):
    import comfy.model_management

    nodes, _, loras = comfy_host
    family, model = FAMILIES[name], models[name]
    style_fmt = FORMATS_BY_HOST.get(host_version(), FORMATS_BY_HOST["0.33.0"])[name][-1]
    subject = random_dit_lora(family, "kohya", rank=SUBJECT_RANK, seed=21, alpha=2.0, std=0.1, modules=lora_modules(name))
    style = random_dit_lora(family, style_fmt, rank=STYLE_RANK, seed=22, std=0.06, modules=lora_modules(name))
    write_lora(loras / f"kd-{name}-subject.safetensors", subject)
    write_lora(loras / f"kd-{name}-style.safetensors", style)
    comfy.model_management.unload_all_models()
    linears = {m: model.get_model_object(f"diffusion_model.{m}") for m in family.recorded}
    originals = {m: (linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone())
                 for m, linear in linears.items()}
    model_out, _, merged, report = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, None, f"kd-{name}-subject.safetensors", f"kd-{name}-style.safetensors", 1.0, STYLE_STRENGTH[method],
        1.0, 1.0, method, "sum")
    dense_c = {k: v for k, v in dense_updates(family, "kohya", subject, dtype=torch.float64).items() if is_switched(name, k)}
    dense_s = {k: STYLE_STRENGTH[method] * v for k, v in dense_updates(family, style_fmt, style, dtype=torch.float64).items()}
    assert set(merged.runtime.layers) == {canonical(k) for k in dense_c}
    assert f"switched per sampling step: {len(dense_c)} layers" in report
    gamma = dense_k_lora_gamma([(dense_c[k], dense_s[k]) for k in dense_c])
    seen = set()
    # cfg 1 on the wide families (one model call per step, not two: their float32 weights are gigabytes)
    calls, records = _sample(model_out, family, 4, 1.0 if name in WIDE_MODULES else 2.0)
    scores, weights = {}, {}  # per recorded linear: the dense rule's S_c, S_s and both effective weights, once
    for module in family.recorded:
        key, layer = f"{module}.weight", merged.runtime.layers[canonical(f"{module}.weight")]
        if method == "est-lora":  # the squared Frobenius norms of the dense updates
            scores[module] = float((dense_c[key] ** 2).sum()), float((dense_s[key] ** 2).sum())
        else:  # k = r_c * r_s of the layer as merged: a split style's q/k/v pieces make one layer of their summed rank
            scores[module] = dense_k_lora_scores(dense_c[key], dense_s[key], layer.subject.rank * layer.style.rank)
        weight = originals[module][0].double()
        weights[module] = {"subject": weight + dense_c[key], "style": weight + dense_s[key]}
    for call, module, x, y in records:
        side = dense_k_lora_choice(*scores[module], gamma, _progress(*calls[call]), "s*", 1.5, 1.275)
        bias = originals[module][1]
        expected = F.linear(x.double(), weights[module][side], None if bias is None else bias.double())
        error = float((y.double() - expected).norm() / expected.norm())
        assert error <= 1e-4, f"{module} at call {call}: relative error {error:.2e} against the {side} update"
        seen.add(side)
    assert records and seen == {"subject", "style"}, seen
    comfy.model_management.unload_all_models()
