"""Attention roles come from ComfyUI's own model classes (nodes/adapter/roles.py), for every family.

Each family's model is built by the host from its detection config (on the meta device: no weights), and the
roles the pack reads from its modules must equal a table written here by hand from each family's architecture:
every query / key / value / output / fused linear has its role, every other linear (MLP, modulation, embedders)
has none. The pack's table must name only classes the host has, and the SDXL roles must equal the UNet names'.

Then models a custom node pack can make (its own attention class, no diffusion_model, an emptied indexed
attribute, a layer that does not fit): nothing it does to the modules the roles are read from may let K-LoRA or
lorarar do, or report, something else than the model in hand gets.
"""

import importlib
import sys

import pytest
import torch

from devkit import synthetic_dit
from devkit.dit_loras import random_dit_lora, write_lora
from devkit.loaded_pack import pack_module
from devkit.synthetic_dit import ALL_FAMILIES, FLUX
from tests.conftest import host_version
from tests.support.families import ROLES, canonical, role_of

pytestmark = pytest.mark.host


def expected_roles(model, family: str) -> dict[str, str]:
    """Canonical name -> role of every 2-D weight of ``model`` the hand-written table gives a role."""
    import torch

    return {canonical(name): role_of(family, name) for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
            and role_of(family, name) is not None}


def meta_model(family):
    """The family's diffusion model as the host builds it from the detection config, on the meta device."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(synthetic_dit.host_config(family))
    return config.get_model({}, device="meta").diffusion_model


def roles_module():
    """nodes/adapter/roles.py as the server loaded the pack (under ComfyUI's package name for it)."""
    import nodes

    return pack_module(nodes, "nodes.adapter.roles")


@pytest.mark.parametrize("name", sorted(set(ROLES) - {"unet"}))
def test_roles_of_each_family_come_from_its_model(comfy_host, name):
    lacks = synthetic_dit.host_lacks(ALL_FAMILIES[name], host_version())
    if lacks:
        pytest.skip(lacks)
    model = meta_model(ALL_FAMILIES[name])
    roles = roles_module().attention_roles(model)
    assert roles == expected_roles(model, name)
    assert roles_module().unknown_attention_classes(model) == []
    assert {"to_out"} <= set(roles.values()), f"{name}: no output projection found"
    # the family entry's attention classes (the allow-list of the test below) are its model's, a base class counting
    classes = {f"{base.__module__}.{base.__qualname__}" for module in model.modules() for base in type(module).__mro__}
    assert set(ALL_FAMILIES[name].attention_classes) <= classes, f"{name}: fix its devkit entry's attention_classes"


def test_unet_roles_equal_the_layout_names(comfy_host, synthetic_model):
    from hypernet.keys import attention_role

    diffusion_model = synthetic_model[0].model.diffusion_model
    roles = roles_module().attention_roles(diffusion_model)
    assert roles == expected_roles(diffusion_model, "unet")
    assert roles and all(attention_role(name) == role for name, role in roles.items())


def test_table_names_classes_the_host_has(comfy_host):
    """A renamed or moved attention class in a new ComfyUI fails here, not silently in a user's K-LoRA run."""
    import comfyui_version

    absent = []
    from hypernet.keys import ATTENTION_ROLES

    for (module, cls), row in roles_module().attention_classes().items():
        try:
            owner = getattr(importlib.import_module(f"comfy.ldm.{module}"), cls)
        except (ImportError, AttributeError):
            absent.append(f"comfy.ldm.{module}.{cls}")
            continue
        assert row and set(row.values()) <= set(ATTENTION_ROLES), owner
    # only the attention classes of the families this host lacks (the old host predates Krea 2), as their devkit
    # entries name them; its other families are checked above through their models
    allowed = {cls for family in ALL_FAMILIES.values() if synthetic_dit.host_lacks(family, comfyui_version.__version__)
               for cls in family.attention_classes}
    assert set(absent) <= allowed, f"attention classes the pack's table names but ComfyUI {comfyui_version.__version__} lacks: {absent}"


def test_an_attention_class_outside_the_table_is_named_and_gets_no_role(comfy_host):
    """AuraFlow's SingleAttention (a family no test builds a whole model of) as ComfyUI constructs it: no role,
    and unknown_attention_classes names it, which the merge node puts in the report of K-LoRA and LoRA.rar."""
    import comfy.ldm.aura.mmdit
    import comfy.ops
    import torch

    model = torch.nn.Sequential(comfy.ldm.aura.mmdit.SingleAttention(64, 2, device="meta",
                                                                     operations=comfy.ops.disable_weight_init))
    assert roles_module().attention_roles(model) == {}
    assert roles_module().unknown_attention_classes(model) == ["comfy.ldm.aura.mmdit.SingleAttention"]


# --- models a custom node pack can make

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
