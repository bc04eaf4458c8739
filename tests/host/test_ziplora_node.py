"""The ZipLoRA node called as ComfyUI calls it, on the synthetic SDXL-class model: a few steps lower the loss on
a fixed batch, the saved result patches what the node's MODEL does, identical inputs reuse the result, and
ComfyUI's interrupt stops a run with the next one unharmed."""

import contextlib

import pytest
import torch

from devkit import synthetic_models
from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host

BLOCK = "input_blocks.3.1.transformer_blocks.0"
BOTH = (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_k", "input_blocks.5.1.transformer_blocks.1.attn1.to_out.0")
SUBJECT_ONLY = f"{BLOCK}.attn1.to_v"
SUBJECT, STYLE = "zipnode_subject.safetensors", "zipnode_style.safetensors"


@pytest.fixture(scope="module")
def vae(comfy_host):
    import comfy.sd

    models = synthetic_models.ensure_models()
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(synthetic_models.checkpoint_path(models)),
                                                         output_vae=True, output_clip=False)
    return vae


@pytest.fixture(scope="module")
def pair(comfy_host, layout):
    _, _, loras = comfy_host
    write_lora(loras / SUBJECT, random_lora(layout, rank=4, seed=231, alpha=2.0, std=0.1, modules=[*BOTH, SUBJECT_ONLY]))
    write_lora(loras / STYLE, random_lora(layout, rank=6, seed=232, std=0.08, modules=list(BOTH)))
    return SUBJECT, STYLE


def _images(seed: int, count: int) -> torch.Tensor:
    """IMAGE (count, 64, 64, 3): 8 x 8 latents, the smallest the synthetic UNet's two downsamplings take whole."""
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def _run(comfy_host, synthetic_model, vae, pair, **overrides):
    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    args = dict(subject_images=_images(1, 2), subject_prompt="a photo of sks dog", style_images=_images(2, 1),
                style_prompt="a watercolor painting", steps=3, learning_rate=0.02, similarity_lambda=0.01, seed=7,
                stop_similarity=0.0)
    args.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LoraRarZipLora"]().optimise(model, clip, vae, *pair, **args)


def _patched_weights(model_patcher):
    import comfy.lora

    state = model_patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patches, state[key].float().clone(), key)
            for key, patches in model_patcher.patches.items()}


def test_a_few_steps_lower_the_loss_and_give_report_curve_and_merged_lora(comfy_host, synthetic_model, vae, pair):
    model_out, clip_out, merged, report, curve = _run(comfy_host, synthetic_model, vae, pair)
    assert "3 of 3 steps" in report and "no early stop" in report and "optimised now" in report
    assert f"coefficients: {len(BOTH)} layers" in report and f"applied to the model: {len(BOTH) + 1} layers" in report
    start, end = (line for line in report.splitlines() if line.startswith("loss on a fixed evaluation batch"))
    total = [float(line.split("total ")[1].split(" ")[0]) for line in (start, end)]
    assert total[1] < total[0], report
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.shape[1] >= 300 and float(curve.std()) > 0
    assert merged.report.method == "ziplora" and set(merged.coefficients) == {"lora_unet_" + m.replace(".", "_") for m in BOTH}
    assert {merged.layers["lora_unet_" + m.replace(".", "_")].rank for m in BOTH} == {4 + 6}
    picture, summary = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarCoefficientPicture"]().draw(merged)
    assert picture.shape[-1] == 3 and "ziplora" in summary


def test_saved_result_through_stock_lora_loading_patches_like_the_node(comfy_host, synthetic_model, vae, pair):
    import comfy.sd
    import comfy.utils

    nodes, _, _ = comfy_host
    model, clip = synthetic_model
    model_out, _, merged, _, _ = _run(comfy_host, synthetic_model, vae, pair)
    (path,) = nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, "ziplora/saved", "fp32", "overwrite")["result"]
    stock, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(path), 1.0, 1.0)
    ours, theirs = _patched_weights(model_out), _patched_weights(stock)
    assert len(ours) == len(BOTH) + 1 and set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_identical_inputs_reuse_the_result_and_a_changed_image_does_not(comfy_host, synthetic_model, vae, pair):
    _, _, first, _, _ = _run(comfy_host, synthetic_model, vae, pair, seed=11, steps=1)
    _, _, again, report, _ = _run(comfy_host, synthetic_model, vae, pair, seed=11, steps=1)
    assert "reused the result" in report and again.layers is first.layers
    other_images = _images(3, 1)
    _, _, changed, report, _ = _run(comfy_host, synthetic_model, vae, pair, seed=11, steps=1, style_images=other_images)
    assert "optimised now" in report and changed.layers is not first.layers


def test_a_model_whose_forward_an_upstream_node_changed_is_not_the_plain_models_result(comfy_host, synthetic_model, vae, pair):
    """A K-LoRA merge upstream changes the model's forward through object patches, not its weights or weight
    patches: the plain model's result was reused for it, and the report said the model was the same."""
    from tests.host.test_nodes_inprocess import _merge

    model, clip = synthetic_model
    _, _, plain, _, _ = _run(comfy_host, synthetic_model, vae, pair, seed=13, steps=1)
    # the style file on both sides: every layer switched at sampling time, none left as a weight patch
    k_lora, _, _, report = _merge(comfy_host, model, None, STYLE, STYLE, method="k-lora")
    assert f"switched per sampling step: {len(BOTH)} layers" in report and not k_lora.patches, report
    _, _, switched, report, _ = _run(comfy_host, (k_lora, clip), vae, pair, seed=13, steps=1)
    assert "optimised now" in report and switched.layers is not plain.layers
    _, _, again, report, _ = _run(comfy_host, (k_lora, clip), vae, pair, seed=13, steps=1)  # the same upstream output
    assert "reused the result" in report and again.layers is switched.layers


def test_interrupt_stops_the_run_and_the_next_call_works(comfy_host, synthetic_model, vae, pair):
    import comfy.model_management
    import comfy.utils

    def interrupt_after_first_step(value, total, preview, node_id=None):
        comfy.model_management.interrupt_current_processing(True)

    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(interrupt_after_first_step)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(comfy_host, synthetic_model, vae, pair, seed=21, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(before)
        comfy.model_management.interrupt_current_processing(False)
    assert not comfy.model_management.processing_interrupted()
    _, _, _, report, _ = _run(comfy_host, synthetic_model, vae, pair, seed=21, steps=1)
    assert "1 of 1 steps" in report and "optimised now" in report


@contextlib.contextmanager
def _one_line_error(match: str):
    """The pack's LoraRarError, as ComfyUI imported it (another module than tests import: matched as its base)."""
    with pytest.raises(ValueError, match=match) as error:
        yield
    assert type(error.value).__name__ == "LoraRarError" and "\n" not in str(error.value)


@pytest.mark.parametrize("what, images", [
    ("subject_images", torch.rand(1, 9, 7, 3)),  # smaller than the VAE's block: used to fail inside its conv
    ("style_images", torch.full((1, 128, 128, 3), float("nan"))),  # used to optimise NaN for minutes
])
def test_unusable_reference_images_fail_at_once_naming_the_input(comfy_host, synthetic_model, vae, pair, what, images):
    with _one_line_error(match=what):
        _run(comfy_host, synthetic_model, vae, pair, **{what: images})


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def test_layers_the_branch_cannot_run_are_named_not_dropped_or_crashed_on(comfy_host, synthetic_model, vae, pair, layout):
    """A LoCon's 3x3 conv layer used to crash the forward with a shape error; a LoHa layer beside plain ones was
    left out of the merged result without a word."""
    _, _, loras = comfy_host
    model, _ = synthetic_model
    conv = "input_blocks.1.0.in_layers.2"
    weight = model.model.state_dict()[f"diffusion_model.{conv}.weight"]
    generator = torch.Generator().manual_seed(5)
    locon = random_lora(layout, rank=4, seed=233, std=0.05, modules=list(BOTH))
    locon[f"{_kohya(conv)}.lora_down.weight"] = torch.randn(4, weight.shape[1], 3, 3, generator=generator) * 0.05
    locon[f"{_kohya(conv)}.lora_up.weight"] = torch.randn(weight.shape[0], 4, 1, 1, generator=generator) * 0.05
    write_lora(loras / "zipnode_locon.safetensors", locon)
    with _one_line_error(match=r"zipnode_locon.safetensors .*in_layers_2: 3x3 conv"):
        _run(comfy_host, synthetic_model, vae, ("zipnode_locon.safetensors", STYLE))

    loha = random_lora(layout, rank=4, seed=234, std=0.05, modules=list(BOTH[:2]))
    d_out, d_in = next((o, i) for m, o, i in layout.attention_linears() if m == SUBJECT_ONLY)
    loha.update({f"{_kohya(SUBJECT_ONLY)}.hada_w1_a": torch.randn(d_out, 2, generator=generator) * 0.1,
                 f"{_kohya(SUBJECT_ONLY)}.hada_w1_b": torch.randn(2, d_in, generator=generator) * 0.1,
                 f"{_kohya(SUBJECT_ONLY)}.hada_w2_a": torch.randn(d_out, 2, generator=generator) * 0.1,
                 f"{_kohya(SUBJECT_ONLY)}.hada_w2_b": torch.randn(2, d_in, generator=generator) * 0.1})
    write_lora(loras / "zipnode_loha.safetensors", loha)
    with _one_line_error(match=r"zipnode_loha.safetensors has 1 diffusion-model layers .*LoHa"):
        _run(comfy_host, synthetic_model, vae, ("zipnode_loha.safetensors", STYLE))


def test_a_loss_that_is_not_finite_stops_the_run_and_nothing_is_applied(comfy_host, synthetic_model, vae, pair, layout):
    """alpha 1e30: the subject branch overflows float32 in the forward, so the loss is Inf/NaN from the start; it used
    to run every step on NaN and then blame the strengths when patching."""
    _, _, loras = comfy_host
    write_lora(loras / "zipnode_hot.safetensors", random_lora(layout, rank=4, seed=235, alpha=1e30, std=0.1, modules=list(BOTH)))
    with _one_line_error(match="loss at start, before any step, is not finite"):
        _run(comfy_host, synthetic_model, vae, ("zipnode_hot.safetensors", STYLE))


def test_a_diverging_run_says_so_in_its_report(comfy_host, synthetic_model, vae, pair):
    """learning rate 1.0 (the input's maximum): the coefficients overshoot and the loss on the fixed batch rises."""
    _, _, _, report, _ = _run(comfy_host, synthetic_model, vae, pair, learning_rate=1.0, steps=3, seed=31)
    start, end = (float(line.split("total ")[1].split(" ")[0]) for line in report.splitlines()
                  if line.startswith("loss on a fixed evaluation batch"))
    assert end > start and "warning: the loss rose" in report and "lower the learning rate (1)" in report, report
    _, _, _, calm, _ = _run(comfy_host, synthetic_model, vae, pair)  # as the first test, whose loss falls
    assert "warning" not in calm, calm
