"""Adding a method with a runtime branch is one module: a toy method defined only here ("the subject on the first
half of the sampling steps, the style on the second"), registered in the loaded pack, runs through the merge node's
MODEL and ComfyUI's own KSampler with no other file changed. Every recorded output of the recorded linears equals
base + the subject's update on the early steps and base + the style's update on the late ones."""

import pytest
import torch
import torch.nn.functional as F

from devkit.dense_rule import dense_update
from devkit.loaded_pack import pack_module
from devkit.loras import random_lora, write_lora

from tests.support.recording import recording_clone

pytestmark = pytest.mark.host

RECORDED = ("input_blocks.3.1.transformer_blocks.0.attn1.to_q", "input_blocks.5.1.transformer_blocks.4.attn2.to_v",
            "input_blocks.5.1.transformer_blocks.2.attn1.to_out.0")
SUBJECT, STYLE = "halfway_subject.safetensors", "halfway_style.safetensors"


def halfway_method(nodes):
    """The toy method, built on the loaded pack's own classes: a sampling-time merge whose runtime part switches
    every layer both LoRAs have from the subject to the style halfway through the sampler's progress."""
    registry = pack_module(nodes, "hypernet.methods")
    runtime = pack_module(nodes, "hypernet.runtime")
    weighted_sum = pack_module(nodes, "hypernet.lowrank").weighted_sum
    is_text_encoder = pack_module(nodes, "hypernet.keys").is_text_encoder
    version = pack_module(nodes, "hypernet").__version__

    class HalfwayBranch(runtime.RuntimeBranch):
        follows_sampling = True

        def __init__(self, part):
            self.part, self.p, self.factors = part, 0.0, runtime.FactorCache()

        def layer_names(self):
            return list(self.part.layers)

        def at_progress(self, p):
            self.p = p

        def extra(self, name, x):
            side = "subject" if self.p < 0.5 else "style"
            layer = self.part.layers[name][side]
            return runtime.low_rank_apply(x, self.factors.get((name, side), layer, x.device, x.dtype))

    class HalfwayPart(runtime.RuntimePart):
        method = "toy-halfway"

        def __init__(self, layers):
            self.layers = layers  # name -> {"subject": LowRankLayer, "style": LowRankLayer}, strengths folded in

        def layer_names(self):
            return list(self.layers)

        def updates(self, name):
            return list(self.layers[name].items())

        def branch(self):
            return HalfwayBranch(self)

        def summary(self):
            return {"switched_layers": len(self.layers)}

        def summary_line(self):
            return f"sampling time: {len(self.layers)} layers, the subject until halfway, then the style"

    class HalfwayMethod(registry.MergeMethod):
        name = "toy-halfway"
        help = "the subject on the first half of the sampling steps, the style on the second (test only)"
        since = version
        position = 1 + max(m.position for m in registry.all_methods() if m.since == version)
        sampling_time = True

        def claim(self, name, subject, style, ctx):
            if subject is None or style is None or is_text_encoder(name):
                return None
            return registry.Claim("switched", "toy: the subject, then the style")

        def merge(self, job, ctx):
            sides = {side: weighted_sum([(layer, weight)], ctx.device, job.dtype) for side, layer, weight in
                     (("subject", job.subject, job.subject_weight), ("style", job.style, job.style_weight))}
            return registry.MergedLayer(None, runtime=sides)

        def finish(self, layers, params):
            return HalfwayPart(dict(layers)) if layers else None

    return registry, HalfwayMethod()


@pytest.fixture
def halfway(comfy_host, layout):
    """(subject state dict, style state dict) in the loras folder, with the toy method registered meanwhile."""
    nodes, _, loras = comfy_host
    subject = random_lora(layout, rank=4, seed=71, alpha=2.0, std=0.1)
    style = random_lora(layout, rank=6, seed=72, std=0.08)
    write_lora(loras / SUBJECT, subject)
    write_lora(loras / STYLE, style)
    registry, method = halfway_method(nodes)
    registry.register(method)
    yield subject, style
    registry.unregister(method.name)


def _conditioning(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]


def test_a_toy_runtime_branch_method_switches_halfway_through_real_sampling(comfy_host, synthetic_model, layout, halfway):
    import comfy.model_management

    from tests.host.test_nodes_inprocess import _merge

    nodes, _, _ = comfy_host
    model, _ = synthetic_model
    comfy.model_management.unload_all_models()
    linears = {module: model.get_model_object(f"diffusion_model.{module}") for module in RECORDED}
    originals = {module: (linear.weight.detach().double().clone(),
                          None if linear.bias is None else linear.bias.detach().double().clone())
                 for module, linear in linears.items()}
    model_out, _, merged, report = _merge(comfy_host, model, None, SUBJECT, STYLE, method="toy-halfway")
    switched = len(layout.attention_linears())
    assert merged.runtime is not None and f"switched per sampling step: {switched} layers" in report
    assert "the subject until halfway, then the style" in report

    steps = 4
    recording, calls, records, handles = recording_clone(model_out, RECORDED)
    try:
        nodes.common_ksampler(recording, 5, steps, 2.0, "euler", "normal", _conditioning(1), _conditioning(2),
                              {"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        for handle in handles:
            handle.remove()
    comfy.model_management.unload_all_models()

    seen = set()
    for call, module, x, y in records:
        sigma, schedule = calls[call]
        index = min(range(len(schedule)), key=lambda i: abs(schedule[i] - sigma))  # euler: at schedule points
        side = "subject" if index / steps < 0.5 else "style"
        other = "style" if side == "subject" else "subject"
        weight, bias = originals[module]
        stem = "lora_unet_" + module.replace(".", "_")
        updates = {"subject": dense_update(halfway[0], stem), "style": dense_update(halfway[1], stem)}
        expected = F.linear(x.double(), weight + updates[side], bias)
        wrong = F.linear(x.double(), weight + updates[other], bias)
        error = float((y.double() - expected).norm() / expected.norm())
        assert error <= 1e-4, f"{module} at step {index}: relative error {error:.2e} against the {side} update"
        assert float((wrong - expected).norm() / expected.norm()) > 1e-2  # the check tells the sides apart
        seen.add((index, side))
    assert seen == {(0, "subject"), (1, "subject"), (2, "style"), (3, "style")}


# SD 1.5's transformer blocks read and write through 1x1 convs (proj_in / proj_out: (B, C, H, W) in and out); the
# toy's branch knows nothing of convs: the injector hands it channels-last rows and puts its h(x) back.
SD15_CONVS = ("input_blocks.1.1.proj_in", "input_blocks.1.1.proj_out")
SD15_WIDE_CONV = "input_blocks.1.0.in_layers.2"  # a 3x3 conv, 320 -> 320


@pytest.fixture(scope="module")
def sd15_model(comfy_host):
    """The synthetic SD 1.5 checkpoint's MODEL (devkit/synthetic_models.py), loaded by ComfyUI's own loader."""
    import comfy.sd

    from devkit import synthetic_models

    root = synthetic_models.ensure_sd15_model(in_process=True)
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(synthetic_models.sd15_checkpoint_path(root)),
                                                           output_vae=False, output_clip=False)
    return model


def _conv_lora(modules, seed: int, kernel: int = 1, rank: int = 3, d: int = 320) -> dict:
    """A kohya conv LoRA on ``modules`` (each d -> d): up (d, r, 1, 1), down (r, d, k, k), alpha = rank."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        stem = "lora_unet_" + module.replace(".", "_")
        state[f"{stem}.lora_up.weight"] = torch.randn(d, rank, 1, 1, generator=generator) * 0.05
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, d, kernel, kernel, generator=generator) * 0.05
        state[f"{stem}.alpha"] = torch.tensor(float(rank))
    return state


def test_a_runtime_update_on_a_1x1_conv_adds_b_a_x(comfy_host, sd15_model, halfway):
    """Through the merge node and the real injector on SD 1.5's proj_in / proj_out: each conv's output is
    conv(x, W) + b + B A x over the channels, for the toy branch written for linears alone."""
    import comfy.model_management

    from devkit.loaded_pack import pack_module
    from tests.host.test_nodes_inprocess import _merge

    nodes, _, loras = comfy_host
    subject = _conv_lora(SD15_CONVS, seed=81)
    write_lora(loras / "conv_subject.safetensors", subject)
    write_lora(loras / "conv_style.safetensors", _conv_lora(SD15_CONVS, seed=82))
    comfy.model_management.unload_all_models()
    originals = {m: sd15_model.get_model_object(f"diffusion_model.{m}") for m in SD15_CONVS}
    originals = {m: (conv.weight.detach().double().clone(), conv.bias.detach().double().clone())
                 for m, conv in originals.items()}
    model_out, _, merged, report = _merge(comfy_host, sd15_model, None, "conv_subject.safetensors",
                                          "conv_style.safetensors", method="toy-halfway")
    assert sorted(merged.runtime.layer_names()) == sorted("lora_unet_" + m.replace(".", "_") for m in SD15_CONVS)
    assert "switched per sampling step: 2 layers" in report and "not switched" not in report, report

    records = []
    handles = [model_out.get_model_object(f"diffusion_model.{m}").register_forward_hook(
        lambda _, inputs, output, m=m: records.append((m, inputs[0].detach().clone(), output.detach().clone())))
        for m in SD15_CONVS]
    generator = torch.Generator().manual_seed(4)
    try:
        with pack_module(nodes, "nodes.adapter").loaded(model_out), torch.no_grad():
            model_out.model.apply_model(torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([1.0]),
                                        c_crossattn=torch.randn(1, 77, 768, generator=generator))
    finally:
        for handle in handles:
            handle.remove()
    comfy.model_management.unload_all_models()
    assert sorted(m for m, _, _ in records) == sorted(SD15_CONVS)
    for module, x, y in records:  # no sampler: the toy's first side, the subject
        weight, bias = originals[module]
        update = dense_update(subject, "lora_unet_" + module.replace(".", "_"))
        expected = F.conv2d(x.double(), weight + update.reshape(weight.shape), bias)
        assert x.dim() == 4 and y.shape == expected.shape
        error = float((y.double() - expected).norm() / expected.norm())
        assert error <= 1e-5, f"{module}: relative error {error:.2e} against base + B A x"
        assert float((F.conv2d(x.double(), weight, bias) - expected).norm() / expected.norm()) > 1e-3, module


def test_a_runtime_method_claiming_a_kxk_conv_is_refused_in_one_line(comfy_host, sd15_model, halfway):
    """The toy claims every layer both LoRAs have, a 3x3 conv too: the merge is refused naming the method, the
    layer and the fix, instead of leaving the layer out of the model silently."""
    from tests.host.test_nodes_inprocess import _merge

    _, _, loras = comfy_host
    write_lora(loras / "wide_subject.safetensors", _conv_lora((SD15_WIDE_CONV,), seed=83, kernel=3))
    write_lora(loras / "wide_style.safetensors", _conv_lora((SD15_WIDE_CONV,), seed=84, kernel=3))
    with pytest.raises(ValueError) as refused:
        _merge(comfy_host, sd15_model, None, "wide_subject.safetensors", "wide_style.safetensors",
               method="toy-halfway")
    message = str(refused.value)
    assert "toy-halfway" in message and "lora_unet_input_blocks_1_0_in_layers_2" in message, message
    assert "3x3 convolution" in message and "decline such layers in claim()" in message, message
    assert "\n" not in message
