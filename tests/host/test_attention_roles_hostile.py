"""Hostile models against the attention roles (nodes/adapter/roles.py): what a custom node pack can do to the
modules the roles are read from must never let K-LoRA / lorarar do, or report, something else than the model in
hand gets."""

import pytest
import torch

from devkit import synthetic_dit
from devkit.dit_loras import random_dit_lora, write_lora
from devkit.synthetic_dit import FLUX

pytestmark = pytest.mark.host


def flux_patcher():
    return synthetic_dit.load_patcher(FLUX, synthetic_dit.ensure_dit(in_process=True), dtype="float32")[0]


def merge(comfy_host, model, subject, style, method):
    node = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarMerge"]()
    return node.merge(model, None, subject, style, 1.0, 1.0, 1.0, 1.0, method, "sum")


class NodePackAttention(torch.nn.Module):
    """What a custom node pack's own attention looks like to the pack: not one of ComfyUI's classes."""


def test_cached_merge_is_not_reused_for_a_model_with_other_attention_classes(comfy_host):
    """Same files, method, model class and unet_config, but the second model's double-block attention is a custom
    node pack's class (state dict and key map unchanged): its roles differ, so K-LoRA must refuse it as it does
    on a fresh run, not hand back the first model's cached K-LoRA merge and report."""
    write_lora(comfy_host[2] / "roles-cache-s.safetensors", random_dit_lora(FLUX, "kohya", seed=61))
    write_lora(comfy_host[2] / "roles-cache-t.safetensors", random_dit_lora(FLUX, "peft", seed=62))
    stock, custom = flux_patcher(), flux_patcher()
    for block in custom.model.diffusion_model.double_blocks:
        block.img_attn.__class__ = block.txt_attn.__class__ = NodePackAttention
    assert set(custom.model.state_dict()) == set(stock.model.state_dict())
    *_, report = merge(comfy_host, stock, "roles-cache-s.safetensors", "roles-cache-t.safetensors", "k-lora")
    assert "k-lora's own rule: " in report
    with pytest.raises(ValueError, match=r"^k-lora: no attention projection is known in this Flux model"):
        merge(comfy_host, custom, "roles-cache-s.safetensors", "roles-cache-t.safetensors", "k-lora")


def test_a_model_without_diffusion_model_is_refused_by_the_lora_read_not_a_traceback(comfy_host):
    """A custom loader's model (unet_config disable_unet_model_creation: no ``diffusion_model`` attribute) has no
    roles to read: the merge refuses in the files' one line, as before the roles, not with an AttributeError."""
    write_lora(comfy_host[2] / "roles-nodm-s.safetensors", random_dit_lora(FLUX, "kohya", seed=63))
    model = flux_patcher()
    del model.model.diffusion_model
    for method in ("direct", "k-lora"):
        with pytest.raises(ValueError, match=r"roles-nodm-s\.safetensors: none of its \d+ LoRA layers is a layer "):
            merge(comfy_host, model, "roles-nodm-s.safetensors", "roles-nodm-s.safetensors", method)


def test_an_emptied_indexed_attribute_has_no_role_instead_of_an_index_error(comfy_host):
    """``to_out.0`` of a CrossAttention whose ``to_out`` a node emptied (or replaced by a shorter Sequential) is no
    linear: no role, not an IndexError blamed on the LoRA files."""
    import comfy.ops
    from comfy.ldm.modules.attention import CrossAttention

    from tests.host.test_attention_roles import roles_module

    attention = CrossAttention(query_dim=8, heads=1, dim_head=8, operations=comfy.ops.disable_weight_init)
    attention.to_out = torch.nn.Sequential()
    holder = torch.nn.Module()
    holder.attn1 = attention
    assert roles_module().attention_roles(holder) == {
        "lora_unet_attn1_to_q": "to_q", "lora_unet_attn1_to_k": "to_k", "lora_unet_attn1_to_v": "to_v"}


def test_own_rule_count_leaves_out_a_layer_that_does_not_fit_the_model(comfy_host):
    """Both LoRAs name img_attn.proj of block 0 but for a wider model: NP-LoRA's rule projects it, then the node
    leaves it out of the patch (skipped, listed). The report's own-rule line must count what was applied by the
    rule, not the dropped layer too."""
    for side, seed in (("s", 64), ("t", 65)):
        state = random_dit_lora(FLUX, "kohya", seed=seed)
        state["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(4, 512) * 0.05
        write_lora(comfy_host[2] / f"roles-misfit-{side}.safetensors", state)
    _, _, applied, report = merge(comfy_host, flux_patcher(), "roles-misfit-s.safetensors",
                                  "roles-misfit-t.safetensors", "np-lora")
    assert applied.report.actions["lora_unet_double_blocks_0_img_attn_proj"] == "skipped"
    projected = applied.report.count("projected")
    assert f"np-lora's own rule: {projected} of {len(applied.report.actions)} layers" in report
