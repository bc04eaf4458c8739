"""SSR-Merge through the merge node on the synthetic SDXL-class model: the calibration's statistics are those of the
layer inputs of the stock KSampler's first step (each LoRA alone, loaded by the stock loader), the merged layers
are the published rule on them, the saved file patches what the node patches, and a calibration that is cancelled
or meets activations that are not finite leaves nothing cached or applied."""

import contextlib

import pytest
import torch

from devkit.loaded_pack import pack_module
from tests.support.calibration import dense_router
from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host

BLOCK = "input_blocks.3.1.transformer_blocks.0"
# attention projections, an MLP linear and a transformer's proj_in: SSR-Merge routes every layer both LoRAs touch
BOTH = (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_k", f"{BLOCK}.attn2.to_out.0",
        "input_blocks.5.1.transformer_blocks.1.ff.net.2", "input_blocks.3.1.proj_in")
SUBJECT_ONLY = f"{BLOCK}.attn1.to_v"
SUBJECT, STYLE, ZERO = "ssr_subject.safetensors", "ssr_style.safetensors", "ssr_zero.safetensors"
PIXELS = 64  # 8 x 8 latents: the smallest the synthetic UNet's two downsamplings take whole
RIDGE = 1e-4


def _stem(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _other_layers(model, rank: int, seed: int, std: float, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Kohya factors for BOTH's layers that are no attention projection (devkit's random_lora makes only those)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module in BOTH[3:]:
        d_out, d_in = model.model.diffusion_model.get_submodule(module).weight.shape[:2]
        out[f"{_stem(module)}.lora_up.weight"] = torch.randn(d_out, rank, generator=generator) * std
        out[f"{_stem(module)}.lora_down.weight"] = torch.randn(rank, d_in, generator=generator) * std
        if alpha is not None:
            out[f"{_stem(module)}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def pair(comfy_host, layout, synthetic_model):
    _, _, loras = comfy_host
    model, _ = synthetic_model
    write_lora(loras / SUBJECT, {**random_lora(layout, rank=4, seed=41, alpha=2.0, std=0.1, modules=[*BOTH, SUBJECT_ONLY]),
                                 **_other_layers(model, 4, 44, 0.1, alpha=2.0)})
    write_lora(loras / STYLE, {**random_lora(layout, rank=6, seed=42, std=0.08, modules=list(BOTH)),
                               **_other_layers(model, 6, 45, 0.08)})
    zero = {**random_lora(layout, rank=4, seed=43, modules=list(BOTH)), **_other_layers(model, 4, 46, 0.1)}
    write_lora(loras / ZERO, {key: torch.zeros_like(value) for key, value in zero.items()})
    return SUBJECT, STYLE


@pytest.fixture(scope="module")
def prompts(comfy_host, synthetic_model):
    nodes, _, _ = comfy_host
    _, clip = synthetic_model
    return {side: nodes.CLIPTextEncode().encode(clip, text)[0]
            for side, text in (("subject", "a photo of sks dog"), ("style", "a watercolor painting"))}


def _merge(comfy_host, model, subject, style, conditioning, **overrides):
    nodes, _, _ = comfy_host
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto")
    args = dict(subject_strength=1.0, style_strength=1.0, subject_clip_strength=1.0, style_clip_strength=1.0,
                method="ssr-merge", layer_policy="sum", ssr_merge_calibration_px=float(PIXELS), ssr_merge_ridge=RIDGE)
    args.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, hypernet, subject, style, subject_conditioning=conditioning.get("subject"),
        style_conditioning=conditioning.get("style"), **args)


def _calibrations(comfy_host):
    nodes, _, _ = comfy_host
    return pack_module(nodes, "nodes.adapter.calibration").CALIBRATIONS


def _forget(comfy_host):
    nodes, _, _ = comfy_host
    pack_module(nodes, "nodes.adapter").forget_results()


def _factors(loras, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (down A (r, d_in), up B (d_out, r) with alpha / rank folded in), float64, read from the file."""
    from safetensors.torch import load_file

    state = load_file(str(loras / name))
    out = {}
    for module in BOTH + (SUBJECT_ONLY,):
        prefix = _stem(module)
        if f"{prefix}.lora_down.weight" not in state:
            continue
        down, up = state[f"{prefix}.lora_down.weight"].double(), state[f"{prefix}.lora_up.weight"].double()
        alpha = state.get(f"{prefix}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        out[module] = (down.flatten(1), up.flatten(1) * scale)
    return out


def _first_step_inputs(comfy_host, model, lora: str, conditioning) -> dict[str, torch.Tensor]:
    """Every BOTH layer's inputs (tokens, d_in) during the stock KSampler's one step (seed 42, CFG 1, euler, an empty
    latent of PIXELS), with ``lora`` alone loaded by the stock LoraLoaderModelOnly at strength 1."""
    nodes, _, _ = comfy_host
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, 1.0)
    recorded: dict[str, list[torch.Tensor]] = {}
    diffusion = patched.model.diffusion_model
    hooks = []
    for name in BOTH:
        def record(module, args, name=name):
            x = args[0]
            x = x.movedim(1, -1) if x.dim() == 4 else x  # a 1x1 conv's channels last: its tokens
            recorded.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).detach().double().cpu())
        hooks.append(diffusion.get_submodule(name).register_forward_pre_hook(record))
    try:
        latent = {"samples": torch.zeros(1, 4, PIXELS // 8, PIXELS // 8)}
        nodes.common_ksampler(patched, 42, 1, 1.0, "euler", "normal", conditioning, conditioning, latent, denoise=1.0)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks) for name, chunks in recorded.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_the_calibration_is_the_ksamplers_first_step_and_the_merge_its_published_rule(comfy_host, synthetic_model,
                                                                                        pair, prompts):
    _, _, loras = comfy_host
    model, _ = synthetic_model
    _forget(comfy_host)
    patched, _, merged, report = _merge(comfy_host, model, *pair, prompts)
    assert "calibration: one sampling step per LoRA on its conditioning, seed 42" in report, report
    assert f"routed" in report and "kept (subject)" in report, report
    statistics = _calibrations(comfy_host).find(lambda key, objects: True)
    assert sorted(statistics) == sorted(map(_stem, BOTH))

    factors = {side: _factors(loras, name) for side, name in zip(("subject", "style"), pair)}
    tokens = {side: _first_step_inputs(comfy_host, model, name, prompts[side]) for side, name in zip(("subject", "style"), pair)}
    for name in BOTH:
        down = torch.cat([factors[side][name][0] for side in ("subject", "style")])
        z = {side: tokens[side][name] @ down.T for side in tokens}
        gram = sum(v.T @ v for v in z.values())
        assert statistics[_stem(name)].tokens == sum(v.shape[0] for v in z.values())
        assert _relative(statistics[_stem(name)].gram, gram) < 1e-4, name  # float32 model vs float64 here

        router = dense_router({side: tokens[side][name] for side in tokens}, {s: factors[s][name][0] for s in factors}, RIDGE)
        up = torch.cat([factors[side][name][1] for side in ("subject", "style")], dim=1)
        layer = merged.layers[_stem(name)]
        ours = layer.up.double().flatten(1) @ layer.down.double().flatten(1) * layer.scale
        assert _relative(ours, up @ router @ down) < 1e-4, name
    kept = merged.layers[_stem(SUBJECT_ONLY)]
    down, up = factors["subject"][SUBJECT_ONLY]
    assert _relative(kept.up.double() @ kept.down.double().flatten(1) * kept.scale, up @ down) < 1e-6


def test_the_saved_file_through_the_stock_loader_patches_what_the_node_patched(comfy_host, synthetic_model, pair, prompts):
    import comfy.lora

    nodes, _, loras = comfy_host
    model, _ = synthetic_model
    patched, _, merged, report = _merge(comfy_host, model, *pair, prompts, subject_strength=0.7)
    assert "calibration: reused" in report, report  # another strength: the statistics of the first test again
    nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, "ssr/test_saved", "fp32", "overwrite")
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "ssr/test_saved.safetensors", 1.0)
    state = model.model.state_dict()
    ours = {key: comfy.lora.calculate_weight(p, state[key].float().clone(), key) for key, p in patched.patches.items()}
    theirs = {key: comfy.lora.calculate_weight(p, state[key].float().clone(), key) for key, p in stock.patches.items()}
    assert sorted(ours) == sorted(theirs) and len(ours) == len(BOTH) + 1
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6), key


def test_without_conditioning_an_all_zero_lora_and_cancel(comfy_host, synthetic_model, pair, prompts):
    import comfy.model_management
    import comfy.utils

    model, _ = synthetic_model
    with pytest.raises(ValueError, match=r"^ssr-merge: connect style_conditioning \(a CLIP Text Encode") as error:
        _merge(comfy_host, model, *pair, {"subject": prompts["subject"]})
    assert "\n" not in str(error.value)

    # an all-zero style LoRA: G is singular before the ridge; its rows route nothing, the subject's stay
    _, _, merged, report = _merge(comfy_host, model, SUBJECT, ZERO, prompts)
    for name in BOTH:
        layer = merged.layers[_stem(name)]
        assert torch.isfinite(layer.up).all() and torch.isfinite(layer.down).all()

    _forget(comfy_host)
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda *_, **__: comfy.model_management.interrupt_current_processing(True))
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _merge(comfy_host, model, *pair, prompts)
    finally:
        comfy.utils.set_progress_bar_global_hook(before)
        comfy.model_management.interrupt_current_processing(False)
    assert _calibrations(comfy_host).find(lambda key, objects: True) is None  # nothing kept from the cancelled run
    _, _, _, report = _merge(comfy_host, model, *pair, prompts)
    assert "calibration: one sampling step per LoRA" in report and "reused" not in report


def test_activations_that_are_not_finite_are_one_line_and_nothing_is_kept(comfy_host, synthetic_model, pair, prompts):
    model, _ = synthetic_model
    _forget(comfy_host)
    cross_attn, extras = prompts["style"][0]
    poisoned = [[torch.full_like(cross_attn, float("nan")), extras]]
    with pytest.raises(ValueError, match="not finite") as error:
        _merge(comfy_host, model, *pair, {"subject": prompts["subject"], "style": poisoned})
    assert "\n" not in str(error.value) and "style LoRA's calibration step" in str(error.value)
    assert _calibrations(comfy_host).find(lambda key, objects: True) is None

    # a conditioning from another model's text encoder (SD 1.5's 768 wide): the model's own error, in one line
    foreign = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(ValueError, match=r"^calibration: the model's step on the subject LoRA's conditioning at "
                                         rf"{PIXELS} px failed \(RuntimeError: ") as error:
        _merge(comfy_host, model, *pair, {"subject": foreign, "style": prompts["style"]})
    assert "\n" not in str(error.value) and "another model's text encoder" in str(error.value)
    assert _calibrations(comfy_host).find(lambda key, objects: True) is None

def test_conditioning_settings_key_the_calibration_and_hostile_inputs_are_one_line(comfy_host, synthetic_model, pair,
                                                                                     prompts):
    model, _ = synthetic_model
    _forget(comfy_host)
    cross_attn, extras = prompts["style"][0]

    def sized(pixels: int) -> list:  # CLIPTextEncodeSDXL's ints: the same tensors, another SDXL size embedding
        return [[cross_attn, {**extras, "width": pixels, "height": pixels, "crop_w": 0, "crop_h": 0,
                              "target_width": pixels, "target_height": pixels}]]

    _merge(comfy_host, model, *pair, {"subject": prompts["subject"], "style": sized(1024)})
    _, _, _, report = _merge(comfy_host, model, *pair, {"subject": prompts["subject"], "style": sized(64)})
    assert "calibration: one sampling step per LoRA" in report and "reused" not in report, report

    for given in ([], [[cross_attn]]):
        with pytest.raises(ValueError, match=r"^ssr-merge: style_conditioning is empty or not a CONDITIONING") as error:
            _merge(comfy_host, model, *pair, {"subject": prompts["subject"], "style": given})
        assert "\n" not in str(error.value)

    # ridge 0 (the widget's minimum) with an all-zero LoRA: G is singular, a one-line refusal naming layer and files
    with pytest.raises(ValueError, match=r"^ssr-merge: layer lora_unet_\w+ of .*ssr_zero\.safetensors: G is singular "
                                         r"with ridge 0 .*set ssr_merge_ridge above 0$") as error:
        _merge(comfy_host, model, SUBJECT, ZERO, prompts, ssr_merge_ridge=0.0)
    assert "\n" not in str(error.value) and "please report" not in str(error.value)


def test_an_empty_prompt_and_a_long_one_calibrate(comfy_host, synthetic_model, pair, prompts):
    """An empty prompt encodes (stock CLIPTextEncode) to a valid conditioning; a long prompt's conditioning (4,000
    tokens here: the stock encoder needs minutes per 10k characters on a CPU, so the tensor stands in for it) only
    lengthens the cross-attention: both calibrate and merge to finite factors."""
    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    empty = nodes.CLIPTextEncode().encode(clip, "")[0]
    cross_attn, extras = prompts["style"][0]
    long = [[cross_attn.repeat(1, 52, 1), extras]]  # 52 chunks of 77 tokens, as the encoder concatenates them
    _, _, merged, report = _merge(comfy_host, model, *pair, {"subject": empty, "style": long})
    assert "calibration: one sampling step per LoRA" in report, report
    assert all(torch.isfinite(layer.up).all() and torch.isfinite(layer.down).all() for layer in merged.layers.values())
