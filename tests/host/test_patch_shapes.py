"""Layers whose shape does not fit the model are never patched, and "applied to the model: N layers" is what
ComfyUI really changes when it loads the patched model for sampling (ModelPatcher.patch_model)."""

import pytest
import torch

from devkit.loras import lora_keys, random_lora, write_lora

pytestmark = pytest.mark.host

BLOCK = "input_blocks.3.1.transformer_blocks.0"
WIDER = f"{BLOCK}.attn1.to_q"  # (640, 640) in the model; the LoRA is for a 1280-wide model
CONV = f"{BLOCK}.attn1.to_v"  # a 3x3 conv factor on a linear projection
TRANSPOSED = f"{BLOCK}.ff.net.2"  # (640, 2560): transposed factors have the same element count


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _subject_with_misfits(layout, style):
    state = random_lora(layout, rank=4, seed=81, std=0.1)
    for module in (WIDER, CONV):
        for key in lora_keys(module, "kohya", layout):
            state.pop(key, None)
            style.pop(key, None)  # only the subject has them: kept (subject), then found not to fit
    stem = {module: _kohya(module) for module in (WIDER, CONV, TRANSPOSED)}
    state[f"{stem[WIDER]}.lora_up.weight"], state[f"{stem[WIDER]}.lora_down.weight"] = torch.randn(1280, 4), torch.randn(4, 1280)
    state[f"{stem[CONV]}.lora_up.weight"], state[f"{stem[CONV]}.lora_down.weight"] = torch.randn(640, 4, 1, 1), torch.randn(4, 640, 3, 3)
    state[f"{stem[TRANSPOSED]}.lora_up.weight"] = torch.randn(2560, 4) * 0.1
    state[f"{stem[TRANSPOSED]}.lora_down.weight"] = torch.randn(4, 640) * 0.1
    return state


def _changed_when_loaded(patcher, keys) -> set[str]:
    """The weights among ``keys`` that differ once ComfyUI loads ``patcher`` the way sampling does
    (model_management.load_models_gpu); every model is unloaded again afterwards, which restores the weights."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # whatever holds these weights now lets go, as before sampling
    state = patcher.model.state_dict()
    before = {key: state[key].detach().clone() for key in keys}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        state = patcher.model.state_dict()
        return {key for key in keys if not torch.equal(before[key], state[key])}
    finally:
        comfy.model_management.unload_all_models()


def test_misfit_layers_are_skipped_named_and_the_applied_count_is_what_comfyui_changes(comfy_host, synthetic_model, layout):
    import comfy.lora

    from tests.host.test_nodes_inprocess import _merge, _text_encoder_layers

    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    style = _text_encoder_layers(random_lora(layout, rank=4, seed=82, std=0.1), 83)
    subject = _text_encoder_layers(_subject_with_misfits(layout, style), 84)
    write_lora(loras / "misfit_subject.safetensors", subject)
    write_lora(loras / "misfit_style.safetensors", style)

    model_out, clip_out, merged, report = _merge(comfy_host, model, clip, "misfit_subject.safetensors", "misfit_style.safetensors")

    assert "not applied: 3 layers whose shape does not fit this model" in report
    for module in (WIDER, CONV, TRANSPOSED):
        assert f"{_kohya(module)}: update of shape" in report and "(from misfit_subject.safetensors)" in report
        assert _kohya(module) not in merged.layers and merged.report.actions[_kohya(module)] == "skipped"
    applied = int(report.split("applied to the model: ")[1].split(" layers")[0])

    unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    names = {name for name in subject} | {name for name in style}
    layer_names = {key.split(".lora_")[0].split(".alpha")[0] for key in names}
    unet_targets = {unet_keys[n] for n in layer_names if n in unet_keys}
    clip_targets = {clip_keys[n] for n in layer_names if n in clip_keys}
    changed = _changed_when_loaded(model_out, unet_targets) | _changed_when_loaded(clip_out.patcher, clip_targets)
    assert len(changed) == applied == len(merged.layers)
    for module in (WIDER, CONV, TRANSPOSED):
        assert unet_keys[_kohya(module)] not in changed
    assert _changed_when_loaded(model, unet_targets) == set()  # the input model stays untouched


def test_only_misfits_is_an_error_naming_a_layer(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, _ = synthetic_model
    wrong = {f"{_kohya(CONV)}.lora_up.weight": torch.ones(640, 2, 1, 1), f"{_kohya(CONV)}.lora_down.weight": torch.ones(2, 640, 3, 3)}
    write_lora(loras / "only_conv_a.safetensors", wrong)
    write_lora(loras / "only_conv_b.safetensors", wrong)
    from tests.host.test_nodes_inprocess import _merge

    with pytest.raises(ValueError, match=r"none of the merged layers fits .*attn1_to_v: update of shape \(640, 5760\)") as error:
        _merge(comfy_host, model, None, "only_conv_a.safetensors", "only_conv_b.safetensors", method="direct")
    assert "\n" not in str(error.value)
