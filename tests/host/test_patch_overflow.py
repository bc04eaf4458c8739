"""Nothing non-finite is patched: a merge whose patch a float16 model cannot hold is an error naming the layer,
and two layer names for one model weight (which ComfyUI would apply only one of) are refused."""

import pytest

from devkit.loaded_pack import pack_module
import torch

from devkit.loras import random_lora, write_lora
from devkit.synthetic_models import checkpoint_path, ensure_models

pytestmark = pytest.mark.host

TO_K = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k"


def _merge(nodes, model, subject, style, clip=None):
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto")
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(model, hypernet, subject, style, 1.0, 1.0, 1.0, 1.0,
                                                             "lorarar", "sum", clip=clip)


@pytest.fixture(scope="module")
def fp16_model(comfy_host):
    import comfy.sd

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(checkpoint_path(ensure_models())), output_vae=False, output_clip=False,
        model_options={"dtype": torch.float16})
    return model


def test_an_update_float16_cannot_hold_is_refused_naming_the_layer(comfy_host, fp16_model, layout):
    nodes, _, loras = comfy_host
    write_lora(loras / "fp16_subject.safetensors", random_lora(layout, rank=4, seed=91))
    style = random_lora(layout, rank=4, seed=92)
    style[f"{TO_K}.lora_up.weight"] = torch.full((640, 4), 100.0)  # |dW| = 4 * 100 * 250 = 1e5 > 65504
    style[f"{TO_K}.lora_down.weight"] = torch.full((4, 640), 250.0)
    write_lora(loras / "fp16_style_huge.safetensors", style)
    with pytest.raises(ValueError, match=rf"layer {TO_K} of .*fp16_style_huge.*float16.*lower the strengths") as error:
        _merge(nodes, fp16_model, "fp16_subject.safetensors", "fp16_style_huge.safetensors")
    assert "\n" not in str(error.value)
    # the same pair patches fine when the update is one a float16 weight holds
    style[f"{TO_K}.lora_up.weight"] = torch.full((640, 4), 1.0)
    style[f"{TO_K}.lora_down.weight"] = torch.full((4, 640), 2.0)
    write_lora(loras / "fp16_style_ok.safetensors", style)
    patched, _, _, report = _merge(nodes, fp16_model, "fp16_subject.safetensors", "fp16_style_ok.safetensors")
    assert f"applied to the model: {len(layout.attention_linears())} layers" in report


def test_k_lora_refuses_a_side_float16_cannot_hold(comfy_host, fp16_model, layout):
    """K-LoRA adds a side's update in the layer's forward, not by patching: the same float16 bound applies."""
    nodes, _, loras = comfy_host
    to_q = TO_K.replace("to_k", "to_q")  # a layer K-LoRA switches (in both LoRAs)
    style = random_lora(layout, rank=4, seed=92)
    style[f"{to_q}.lora_up.weight"] = torch.full((640, 4), 100.0)
    style[f"{to_q}.lora_down.weight"] = torch.full((4, 640), 250.0)
    write_lora(loras / "fp16_klora_subject.safetensors", random_lora(layout, rank=4, seed=91))
    write_lora(loras / "fp16_klora_style_huge.safetensors", style)
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto")
    merge = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]()
    with pytest.raises(ValueError, match=rf"layer {to_q} of fp16_klora_style_huge.* \(k-lora, style side\).*float16"
                                         ".*lower the strengths") as error:
        merge.merge(fp16_model, hypernet, "fp16_klora_subject.safetensors", "fp16_klora_style_huge.safetensors",
                    1.0, 1.0, 1.0, 1.0, "k-lora", "sum")
    assert "\n" not in str(error.value)


def test_two_names_for_one_weight_pair_up_across_files_and_are_refused_within_one(comfy_host, synthetic_model, layout):
    """lora_te_ and lora_te1_ both name SDXL's first text encoder in ComfyUI's key map: a subject written one way
    and a style the other merge that layer once (before, ComfyUI would have applied only one of two patches);
    one file holding both names is refused, naming them."""
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    for name, prefixes, seed in (("te_subject.safetensors", ("lora_te_",), 93), ("te1_style.safetensors", ("lora_te1_",), 94),
                                 ("te_both.safetensors", ("lora_te_", "lora_te1_"), 95)):
        state = random_lora(layout, rank=4, seed=seed)
        for prefix in prefixes:
            state[f"{prefix}{q}.lora_up.weight"] = torch.randn(768, 2) * 0.01
            state[f"{prefix}{q}.lora_down.weight"] = torch.randn(2, 768) * 0.01
        write_lora(loras / name, state)
    _, _, merged, report = _merge(nodes, model, "te_subject.safetensors", "te1_style.safetensors", clip=clip)
    text_layers = [name for name in merged.layers if name.startswith("lora_te")]
    assert text_layers == [f"lora_te1_{q}"] and merged.layers[text_layers[0]].rank == 4  # both sides, summed
    with pytest.raises(ValueError, match=rf"te_both\.safetensors: layers lora_te1_{q}, lora_te_{q} all patch "
                                         rf"lora_te1_{q} \(the same layer written twice\)"):
        _merge(nodes, model, "te_both.safetensors", "te1_style.safetensors", clip=clip)


def test_a_rerun_reuses_the_patch_check_but_another_model_is_checked_again(comfy_host, synthetic_model, fp16_model,
                                                                             layout, monkeypatch):
    """The verdict (fit, overflow, state dict) is cached per merged LoRA and model: a re-run with the same
    inputs skips it, a model with other weights (float16 here) or with other patches upstream is rechecked."""
    import sys

    nodes, _, loras = comfy_host
    model, _ = synthetic_model
    verdicts = pack_module(nodes, "nodes.adapter.model").VERDICTS
    made = verdicts.made
    write_lora(loras / "rerun_subject.safetensors", random_lora(layout, rank=4, seed=95))
    style = random_lora(layout, rank=4, seed=96)
    style[f"{TO_K}.lora_up.weight"] = torch.full((640, 4), 100.0)  # fine in float32, overflows float16
    style[f"{TO_K}.lora_down.weight"] = torch.full((4, 640), 250.0)
    write_lora(loras / "rerun_style.safetensors", style)

    first = _merge(nodes, model, "rerun_subject.safetensors", "rerun_style.safetensors")
    again = _merge(nodes, model, "rerun_subject.safetensors", "rerun_style.safetensors")
    assert verdicts.made - made == 1 and again[3] == first[3]
    assert set(again[0].patches) == set(first[0].patches) and again[0] is not first[0]  # a fresh patched clone
    with pytest.raises(ValueError, match=rf"layer {TO_K} of .*rerun_style.*float16"):
        _merge(nodes, fp16_model, "rerun_subject.safetensors", "rerun_style.safetensors")
    assert verdicts.made - made == 2
    upstream, _ = nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, None, "rerun_subject.safetensors", 0.5, 0.0)
    _merge(nodes, upstream, "rerun_subject.safetensors", "rerun_style.safetensors")
    assert verdicts.made - made == 3
