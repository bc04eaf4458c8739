"""The synthetic DiT models (devkit/synthetic_dit.py) are what ComfyUI takes them for, sample, and take LoRAs.

Per family and host: ComfyUI's detection picks the expected supported-model class, the detected config
has the shrunk widths, one comfy.sample step runs on conditioning built directly, and a random LoRA in
each format patches exactly the native linears it trains (fused q/k/v pieces included) with the update
its factors give, as ComfyUI's own patcher applies it when loading the model for sampling.
"""

import sys

import pytest
import torch

from devkit import synthetic_dit, synthetic_models
from devkit.dit_loras import FORMATS, FORMATS_BY_HOST, dense_updates, random_dit_lora
from devkit.synthetic_dit import FAMILIES, FLUX_HEAD_DIM

pytestmark = pytest.mark.host

# Native linears a LoRA of every format trains: Flux 2 double blocks x 8 (img/txt qkv, proj, mlp.0, mlp.2)
# + 2 single blocks x 2 (linear1, linear2); SD3.5 block 0: 6 x_block (attn, attn2, mlp) + 4 context_block,
# block 1 (the last, whose context side only feeds keys and values): 4 x_block + the context qkv.
PATCHED_LINEARS = {"flux": 2 * 8 + 2 * 2, "sd35": 6 + 4 + 4 + 1}
CASES = [(name, fmt) for name in FAMILIES for fmt in FORMATS[name]]


@pytest.fixture(scope="module")
def dit_host():
    """(ComfyUI version, models root) with comfy imported on the CPU and the DiT files built."""
    synthetic_models._import_comfy()
    root = str(synthetic_models.comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfyui_version

    return comfyui_version.__version__, synthetic_dit.ensure_dit(in_process=True)


@pytest.fixture(scope="module")
def patchers(dit_host):
    """family name -> (ModelPatcher, how it was loaded), loaded once per module."""
    _, root = dit_host
    return {name: synthetic_dit.load_patcher(family, root) for name, family in FAMILIES.items()}


def _skip_if_host_lacks(family, version):
    import comfy.model_base

    if not hasattr(comfy.model_base, family.model_class):
        pytest.skip(f"ComfyUI {version} has no {family.model_class} model ({family.name})")


def _weight_deltas(patcher, keys) -> dict[str, torch.Tensor]:
    """key -> (weight once ComfyUI loads ``patcher`` for sampling) - (weight before), for the keys that change.
    Every model is unloaded afterwards, which restores the weights."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    state = patcher.model.state_dict()
    before = {key: state[key].detach().float().clone() for key in keys}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        state = patcher.model.state_dict()
        deltas = {key: state[key].detach().float() - before[key] for key in keys}
        return {key: delta for key, delta in deltas.items() if delta.abs().max() > 0}
    finally:
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_detected_as_its_family_and_one_sampling_step_runs(dit_host, patchers, name):
    import comfy.sd
    import comfy.utils

    version, root = dit_host
    family = FAMILIES[name]
    _skip_if_host_lacks(family, version)
    assert synthetic_dit.detected_class(family, root) == family.model_class
    patcher, how = patchers[name]
    assert type(patcher.model.model_config).__name__ == family.model_class
    config = patcher.model.model_config.unet_config
    if name == "flux":
        assert (config["hidden_size"], config["num_heads"], config["context_in_dim"], config["vec_in_dim"]) == (
            family.hidden_size, family.hidden_size // FLUX_HEAD_DIM, family.context_dim, family.pooled_dim)
    else:
        assert (config["depth"] * 64, config["adm_in_channels"], config["in_channels"]) == (
            family.hidden_size, family.pooled_dim, family.latent_channels)
    if how != "load_diffusion_model_state_dict":  # only where the host's own loader cannot build the tiny model
        with pytest.raises(ValueError, match="num_heads|positional dim"):
            comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(family.path(root))))

    latent = synthetic_dit.sample_step(patcher, family)

    assert latent.shape == (1, family.latent_channels, 16, 16)
    assert torch.isfinite(latent).all() and latent.abs().max() > 0


@pytest.mark.parametrize("name,fmt", CASES)
def test_lora_patches_the_linears_it_trains_with_its_update(dit_host, patchers, name, fmt, tmp_path):
    import comfy.sd

    version, root = dit_host
    family = FAMILIES[name]
    _skip_if_host_lacks(family, version)
    patcher, _ = patchers[name]
    lora = random_dit_lora(family, fmt, rank=4, seed=7, alpha=2.0, root=root)
    expected = {f"diffusion_model.{key}": update for key, update in dense_updates(family, fmt, lora, root).items()}

    assert len(expected) == PATCHED_LINEARS[name]

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)

    if fmt not in FORMATS_BY_HOST.get(version, FORMATS)[name]:
        assert set(patched.patches) == set(), f"ComfyUI {version} now maps {fmt} LoRAs for {name}: update FORMATS_BY_HOST"
        return
    assert set(patched.patches) == set(expected)
    deltas = _weight_deltas(patched, list(expected))
    assert set(deltas) == set(expected)
    for key, update in expected.items():
        torch.testing.assert_close(deltas[key], update, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    assert patcher.patches == {}  # the input model keeps no patch (load_lora_for_models patches a clone)
