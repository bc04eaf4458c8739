"""K-LoRA and EST-LoRA through the merge node's MODEL output, sampled by ComfyUI's own samplers: at every recorded
model call, each switched attention linear computes x @ (W + dW_choice)^T + b with dW_choice the subject's or the
style's update as the dense rule picks it at that call's place in the sampler's schedule (K-LoRA scores each update
by its top-k entries, EST-LoRA by its squared Frobenius norm; the choice rule is the same)."""

import pytest
import torch
import torch.nn.functional as F

from devkit.dense_rule import dense_k_lora_choice, dense_k_lora_gamma, dense_k_lora_scores, dense_update
from devkit.loras import random_lora, write_lora

from tests.support.recording import recording_clone

pytestmark = pytest.mark.host

RECORDED = ("input_blocks.3.1.transformer_blocks.0.attn1.to_q", "input_blocks.3.1.transformer_blocks.1.attn2.to_k",
            "input_blocks.5.1.transformer_blocks.2.attn1.to_out.0", "input_blocks.5.1.transformer_blocks.4.attn2.to_v")
PATTERNS = {"k-lora": ("s*", 1.5, 1.275), "k-lora-linear": ("linear", 1.5, 0.5), "est-lora": ("s*", 1.5, 1.275)}
SUBJECT_RANK, STYLE_RANK = 4, 6


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


@pytest.fixture(scope="module")
def pair(comfy_host, layout):
    """(subject state dict, style state dict), written to the loras folder as ks_subject / ks_style."""
    _, _, loras = comfy_host
    subject = random_lora(layout, rank=SUBJECT_RANK, seed=91, alpha=2.0, std=0.1)
    style = random_lora(layout, rank=STYLE_RANK, seed=92, std=0.06)
    write_lora(loras / "ks_subject.safetensors", subject)
    write_lora(loras / "ks_style.safetensors", style)
    return subject, style


def dense_scores(method: str, dw_c: torch.Tensor, dw_s: torch.Tensor, k: int) -> tuple[float, float]:
    """What the method's rule compares, from the dense updates: EST-LoRA the squared Frobenius norms, K-LoRA the
    sums of the k largest |entries|."""
    if method == "est-lora":
        return float((dw_c * dw_c).sum()), float((dw_s * dw_s).sum())
    return dense_k_lora_scores(dw_c, dw_s, k)


class DenseKLora:
    """The published rule on dense updates of every attention linear (the test's own reference)."""

    def __init__(self, layout, subject, style, method):
        self.pattern, self.alpha, self.beta = PATTERNS[method]
        self.updates, self.scores = {}, {}
        for module, _, _ in layout.attention_linears():
            stem = _kohya(module)
            dw_c, dw_s = dense_update(subject, stem), dense_update(style, stem)
            self.updates[module] = {"subject": dw_c, "style": dw_s}
            self.scores[module] = dense_scores(method, dw_c, dw_s, SUBJECT_RANK * STYLE_RANK)
        self.gamma = dense_k_lora_gamma([(u["subject"], u["style"]) for u in self.updates.values()])

    def choice(self, module: str, p: float) -> str:
        return dense_k_lora_choice(*self.scores[module], self.gamma, p, self.pattern, self.alpha, self.beta)


def _conditioning(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]


def _sample(nodes, model, steps: int, sampler: str, scheduler: str):
    """A real KSampler run, recording every model call's sigma and schedule and, for the RECORDED linears,
    their input and output: returns (calls [(sigma, schedule)], records [(call index, module, x, y)])."""
    recording, calls, records, handles = recording_clone(model, RECORDED)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    try:
        (out,) = nodes.common_ksampler(recording, 7, steps, 2.0, sampler, scheduler, _conditioning(1), _conditioning(2), latent)
    finally:
        for handle in handles:
            handle.remove()
    return calls, records, out["samples"]


def _progress(sigma: float, schedule: list[float]) -> float:
    """The test's own p: these samplers evaluate the model exactly at schedule points."""
    index = min(range(len(schedule)), key=lambda i: abs(schedule[i] - sigma))
    assert abs(schedule[index] - sigma) <= 1e-6 * max(1.0, sigma), (sigma, schedule)
    return index / (len(schedule) - 1)


def _check_calls(originals, calls, records, rule: DenseKLora, extra=None) -> dict[str, set]:
    """Every record equals base (+ extra) + the rule's choice; returns module -> the sides seen."""
    seen: dict[str, set] = {}
    for call, module, x, y in records:
        weight, bias = originals[module]
        bias = None if bias is None else bias.double()
        base = weight.double() + (extra[module] if extra else 0)
        side = rule.choice(module, _progress(*calls[call]))
        other = "style" if side == "subject" else "subject"
        expected = F.linear(x.double(), base + rule.updates[module][side], bias)
        wrong = F.linear(x.double(), base + rule.updates[module][other], bias)
        error = float((y.double() - expected).norm() / expected.norm())
        assert error <= 1e-4, f"{module} at call {call}: relative error {error:.2e} against the {side} update"
        assert float((wrong - expected).norm() / expected.norm()) > 100 * 1e-4  # the check tells the sides apart
        seen.setdefault(module, set()).add(side)
    return seen


def _weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (weight, bias) as the model holds them now (unpatched after unload_all_models)."""
    linears = {module: model.get_model_object(f"diffusion_model.{module}") for module in RECORDED}
    return {module: (linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone())
            for module, linear in linears.items()}


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_k_lora_follows_the_samplers_progress_with_euler_at_two_step_counts(comfy_host, synthetic_model, layout, pair,
                                                                             method):
    import comfy.model_management

    from tests.host.test_nodes_inprocess import _merge

    nodes, _, _ = comfy_host
    model, _ = synthetic_model
    comfy.model_management.unload_all_models()
    before = _weights(model)
    _, _, plain_before = _sample(nodes, model, 2, "euler", "normal")
    model_out, _, merged, report = _merge(comfy_host, model, None, "ks_subject.safetensors", "ks_style.safetensors",
                                          method=method)
    switched = len(layout.attention_linears())
    assert f"switched per sampling step: {switched} layers" in report and merged.runtime is not None
    rule = DenseKLora(layout, *pair, method)
    seen = {}
    for steps in (4, 5):  # a call counter would drift between step counts; the sampler's progress does not
        calls, records, _ = _sample(nodes, model_out, steps, "euler", "normal")
        assert len({round(_progress(*call) * steps) for call in calls}) == steps
        for module, sides in _check_calls(before, calls, records, rule).items():
            seen.setdefault(module, set()).update(sides)
    assert set().union(*seen.values()) == {"subject", "style"}, seen

    comfy.model_management.unload_all_models()  # object patches restored: the input model is as before
    after = _weights(model)
    assert all(torch.equal(before[m][0], after[m][0]) for m in RECORDED)
    _, _, plain_after = _sample(nodes, model, 2, "euler", "normal")
    assert torch.equal(plain_before, plain_after)


def test_k_lora_linear_with_heun_karras_under_a_stock_lora_on_the_same_layers(comfy_host, synthetic_model, layout, pair):
    """A second-order sampler (model calls at two schedule points per step), the linear pattern, and a stock
    LoRA loaded on top of the merge's MODEL: its weight patch and K-LoRA's choice both apply."""
    import comfy.model_management
    import comfy.sd

    from tests.host.test_nodes_inprocess import _merge

    nodes, _, _ = comfy_host
    model, _ = synthetic_model
    comfy.model_management.unload_all_models()
    originals = _weights(model)
    model_out, _, _, _ = _merge(comfy_host, model, None, "ks_subject.safetensors", "ks_style.safetensors",
                                method="k-lora-linear")
    stock_lora = random_lora(layout, rank=2, seed=93, std=0.05, modules=list(RECORDED))
    stacked, _ = comfy.sd.load_lora_for_models(model_out, None, stock_lora, 0.5, 0.0)
    extra = {module: 0.5 * dense_update(stock_lora, _kohya(module)) for module in RECORDED}
    calls, records, _ = _sample(nodes, stacked, 3, "heun", "karras")
    assert len(calls) > 3  # heun evaluates twice per step (but the last)
    seen = _check_calls(originals, calls, records, DenseKLora(layout, *pair, "k-lora-linear"), extra)
    assert set().union(*seen.values()) == {"subject", "style"}, seen
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_the_save_node_refuses_a_k_lora_merge_in_one_line(comfy_host, synthetic_model, pair, method):
    from tests.host.test_nodes_inprocess import _merge

    nodes, folder_paths, loras = comfy_host
    model, _ = synthetic_model
    _, _, merged, _ = _merge(comfy_host, model, None, "ks_subject.safetensors", "ks_style.safetensors", method=method)
    with pytest.raises(ValueError, match=f"{method} chooses per step at sampling time; it cannot be saved as one LoRA file") as error:
        nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, "merged/switched", "fp16", "error")
    assert "\n" not in str(error.value) and not (loras / "merged" / "switched.safetensors").exists()
