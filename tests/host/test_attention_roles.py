"""Attention roles come from ComfyUI's own model classes (nodes/adapter/roles.py), for every family.

Each family's model is built by the host from its detection config (on the meta device: no weights), and the
roles the pack reads from its modules must equal a table written here by hand from each family's architecture:
every query / key / value / output / fused linear has its role, every other linear (MLP, modulation, embedders)
has none. The pack's table must name only classes the host has, and the SDXL roles must equal the UNet names'.
"""

import importlib
import sys

import pytest

from devkit.loaded_pack import pack_module

from devkit import synthetic_dit
from devkit.synthetic_dit import ALL_FAMILIES
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
    # the old host predates Krea 2 (and its other families are checked above through their models)
    allowed = {"comfy.ldm.krea2.model.Attention"} if comfyui_version.__version__.startswith("0.3.") else set()
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
