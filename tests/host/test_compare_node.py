"""The compare node in a real ComfyUI process: columns that cannot run, and one encoding per distinct text encoder."""

import sys

import pytest

from devkit.loaded_pack import pack_module
import torch

from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host


def _comparing(comfy_host):
    """nodes/adapter/merging.py (which runs the compare node) as ComfyUI loaded the pack."""
    nodes, _, _ = comfy_host
    return pack_module(nodes, "nodes.adapter.merging")


def test_when_no_column_can_run_the_node_fails_naming_each_reason(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "compare_subject.safetensors", random_lora(layout, rank=4, seed=31))
    write_lora(loras / "compare_style.safetensors", random_lora(layout, rank=4, seed=32))
    node = nodes.NODE_CLASS_MAPPINGS["LoraRarCompare"]()
    with pytest.raises(ValueError) as error:  # LoraRarError, as the pack's module loaded in ComfyUI defines it
        node.compare(model, None, "compare_subject.safetensors", "compare_style.safetensors", "a dog", "",
                     {"samples": torch.zeros(1, 4, 4, 4)}, 1, 1, 1.0, "euler", "normal", 1.0, "b-lora, lorarar", "sum",
                     clip=clip)
    message = str(error.value)
    assert "\n" not in message and message.startswith("compare: no method could run on these inputs")
    assert "b-lora: b-lora: no published content/style block split for KOALA_700M" in message
    assert "lorarar: lorarar needs a hypernet: connect the LoRA.rar Hypernet Loader" in message


def test_a_clip_with_text_encoder_patches_is_encoded_again_and_one_without_reuses(comfy_host, synthetic_model):
    _, clip = synthetic_model
    nodes, _, _ = comfy_host
    comparing = pack_module(nodes, "nodes.adapter.sampling")  # the encodings the compare and ZipLoRA nodes share
    comparing.ENCODINGS.clear()
    prompt = "a photo of sks dog"  # as positive and negative prompt: encoded once (each encoding costs seconds)
    base = comparing.encode_prompts(clip, prompt, prompt)
    assert comparing.encode_prompts(clip.clone(), prompt, prompt, connected=clip) is base

    patched = clip.clone()
    key = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("self_attn.q_proj.weight"))
    weight = clip.cond_stage_model.state_dict()[key]
    assert patched.add_patches({key: ("diff", (torch.full_like(weight, 0.05),))}) == [key]
    own = comparing.encode_prompts(patched, prompt, prompt, connected=clip)
    assert own is not base
    assert not torch.equal(own[0][0][0], base[0][0][0])  # the text-encoder patch changed the conditioning
    assert comparing.encode_prompts(clip, prompt, prompt) is base  # the unpatched CLIP's entry is still there
