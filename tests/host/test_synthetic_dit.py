"""The synthetic DiT models (devkit/synthetic_dit.py) are what ComfyUI takes them for, sample, and take LoRAs.

Per family and host (ComfyUI 0.3.75 has no Krea 2: those cases skip saying so): ComfyUI's detection picks the
expected supported-model class, the detected config has the shrunk widths, one comfy.sample step runs on
conditioning built directly, the stock VAELoader decodes the family's latents, and a random LoRA in each format
patches exactly the native linears it trains (fused q/k/v pieces included) with the update its factors give, as
ComfyUI's own patcher applies it when loading the model for sampling. The tables (FAMILIES_BY_HOST,
FORMATS_BY_HOST, PARTIAL_BY_HOST) are checked against the host, so a host that starts mapping a format fails here.
"""

import sys

import pytest
import torch

from devkit import synthetic_dit, synthetic_models
from devkit.dit_loras import FORMATS, FORMATS_BY_HOST, PARTIAL_BY_HOST, dense_updates, native_linears, random_dit_lora
from devkit.synthetic_dit import ALL_FAMILIES, FAMILIES_BY_HOST, VAES_BY_HOST

pytestmark = pytest.mark.host

# Native linears a LoRA of every format trains: each family entry's ``trained_linears``, counted by hand from its
# blocks (devkit/synthetic_dit.py); devkit/dit_loras.native_linears reads them from the file.
# The 3840- and 3072-wide families train one linear in the value test: Z-Image's fused qkv (44 M numbers, three
# diffusers bands), one of Qwen-Image's (9 M; its names are diffusers' own). Their whole sets (885 M, 226 M) take
# minutes to patch on 2 CPU cores; every linear's mapping is checked by key instead (cheap).
TRAINED_FOR_VALUES = {"zimage": ["layers.0.attention.qkv"], "qwen_image": ["transformer_blocks.0.attn.add_k_proj"]}
# |delta - update| bound per weight dtype: float16 weights round the patched sum to 2**-15 near 0.03-0.06
TOLERANCE = {"float32": dict(atol=1e-5, rtol=1e-4), "float16": dict(atol=4e-5, rtol=1e-3)}
CASES = [(name, fmt) for name in ALL_FAMILIES for fmt in FORMATS[name]]


class _Loaded(dict):
    """family name -> (ModelPatcher, how it was loaded), each loaded on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        self[name] = synthetic_dit.load_patcher(ALL_FAMILIES[name], self.root)
        return self[name]


@pytest.fixture(scope="module")
def dit_host():
    """(ComfyUI version, models root) with comfy imported on the CPU and the host's DiT files and VAEs built."""
    synthetic_models.import_comfy()
    root = str(synthetic_models.comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfyui_version

    return comfyui_version.__version__, synthetic_dit.ensure_dit(families=synthetic_dit.host_families(),
                                                                 in_process=True)


@pytest.fixture(scope="module")
def patchers(dit_host):
    _, root = dit_host
    return _Loaded(root)


def _skip_if_host_lacks(family, version):
    reason = synthetic_dit.host_lacks(family, version)
    if reason:
        pytest.skip(f"{reason} model ({family.name})")


def _weight_deltas(patcher, keys) -> dict[str, torch.Tensor]:
    """key -> (weight once ComfyUI loads ``patcher`` for sampling) - (weight before), for the keys that change.
    Every model is unloaded afterwards, which restores the weights."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    state = patcher.model.state_dict()
    before = {key: state[key].detach().to(torch.float32, copy=True) for key in keys}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        state = patcher.model.state_dict()
        deltas = {key: state[key].detach().float() - before[key] for key in keys}
        return {key: delta for key, delta in deltas.items() if delta.any()}
    finally:
        comfy.model_management.unload_all_models()


def _mapped(version, name, fmt, natives) -> set[str]:
    """The model weight keys of ``natives`` the host maps a ``fmt`` LoRA onto, as the tables say."""
    if fmt in FORMATS_BY_HOST.get(version, FORMATS)[name]:
        return {f"diffusion_model.{native}.weight" for native in natives}
    partial = PARTIAL_BY_HOST.get((version, name), {}).get(fmt)
    return {f"diffusion_model.{native}.weight" for native in natives if partial and partial.match(f"{native}.weight")}


@pytest.fixture(scope="module")
def vae_loader(dit_host):
    """ComfyUI's stock VAELoader, reading the synthetic VAEs from the models root."""
    import folder_paths
    import nodes

    _, root = dit_host
    for folder in ("vae", "vae_approx"):
        folder_paths.add_model_folder_path(folder, str(root / folder))
    return nodes.VAELoader()


def _loads(vae_loader, name: str) -> bool:
    try:
        return vae_loader.load_vae(name)[0].latent_channels == synthetic_dit.VAES[name].latent_channels
    except Exception:  # any refusal (a name the loader does not list, an undetected file) means it cannot
        return False


def test_the_tables_name_the_families_and_vaes_the_host_has(dit_host, vae_loader):
    version, _ = dit_host
    assert FAMILIES_BY_HOST[version] == tuple(synthetic_dit.host_families())
    assert VAES_BY_HOST[version] == tuple(name for name in synthetic_dit.VAES if _loads(vae_loader, name))


@pytest.mark.parametrize("name", list(ALL_FAMILIES))
def test_detected_as_its_family_and_one_sampling_step_runs(dit_host, patchers, name):
    version, root = dit_host
    family = ALL_FAMILIES[name]
    _skip_if_host_lacks(family, version)
    patcher, how = patchers[name]
    assert type(patcher.model.model_config).__name__ == family.model_class  # the stock loader's detection
    config = patcher.model.model_config.unet_config
    assert {key: config.get(key) for key in family.config} == family.config
    if how != "load_diffusion_model_state_dict":  # only where the host's own loader cannot build the tiny model
        import comfy.sd
        import comfy.utils

        assert synthetic_dit.detected_class(family, root) == family.model_class
        with pytest.raises(ValueError, match="num_heads|positional dim"):
            comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(family.path(root))))

    latent = synthetic_dit.sample_step(patcher, family)

    assert latent.shape == family.latent_shape(16)
    assert torch.isfinite(latent).all() and latent.abs().max() > 0


@pytest.mark.parametrize("name", list(ALL_FAMILIES))
def test_the_test_node_conditions_it_and_the_stock_vae_loader_decodes_its_latents(dit_host, patchers, vae_loader,
                                                                                  name):
    from devkit.comfy_nodes.lorarar_test_nodes import LoraRarTestConditioning

    version, _ = dit_host
    family = ALL_FAMILIES[name]
    _skip_if_host_lacks(family, version)
    ((cross, extras),) = LoraRarTestConditioning().condition(patchers[name][0], seed=5, tokens=7, batch=2)[0]
    ((again, again_extras),) = synthetic_dit.conditioning(family, batch=2, tokens=7, seed=5)
    assert torch.equal(cross, again) and extras.keys() == again_extras.keys()
    if synthetic_dit.vae_lacks(family, version):
        pytest.skip(synthetic_dit.vae_lacks(family, version))

    (vae,) = vae_loader.load_vae(family.vae)
    image = vae.decode(torch.randn(family.latent_shape(4)))

    assert vae.latent_channels == family.latent_channels
    assert image.shape[-1] == 3 and image.shape[-3] >= 32 and torch.isfinite(image).all()


@pytest.mark.parametrize("name,fmt", CASES)
def test_lora_patches_the_linears_it_trains_with_its_update(dit_host, patchers, name, fmt):
    import comfy.sd

    version, root = dit_host
    family = ALL_FAMILIES[name]
    _skip_if_host_lacks(family, version)
    patcher, _ = patchers[name]
    lora = random_dit_lora(family, fmt, rank=4, seed=7, alpha=2.0, root=root, modules=TRAINED_FOR_VALUES.get(name))
    updates = dense_updates(family, fmt, lora, root)
    expected = {f"diffusion_model.{key}": update for key, update in updates.items()
                if f"diffusion_model.{key}" in _mapped(version, name, fmt, [key[:-len(".weight")]])}

    assert len(updates) == (len(TRAINED_FOR_VALUES[name]) if name in TRAINED_FOR_VALUES else family.trained_linears)

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)

    assert set(patched.patches) == set(expected), f"update FORMATS_BY_HOST / PARTIAL_BY_HOST for ComfyUI {version}"
    deltas = _weight_deltas(patched, list(expected))
    assert set(deltas) == set(expected)
    for key, update in expected.items():
        torch.testing.assert_close(deltas[key], update, **TOLERANCE[family.dtype], msg=lambda m: f"{key}: {m}")
    assert patcher.patches == {}  # the input model keeps no patch (load_lora_for_models patches a clone)


@pytest.mark.parametrize("name,fmt", [case for case in CASES if case[0] in TRAINED_FOR_VALUES])
def test_every_trained_linear_of_a_wide_model_is_mapped(dit_host, patchers, name, fmt):
    """What the value test leaves out: a LoRA on all of Z-Image's / Qwen-Image's linears (rank 2, no alpha) maps
    onto each of them (ComfyUI's patch list; no weight is computed)."""
    import comfy.sd

    version, root = dit_host
    family = ALL_FAMILIES[name]
    _skip_if_host_lacks(family, version)
    natives = native_linears(family, root)
    lora = random_dit_lora(family, fmt, rank=2, seed=3, root=root)

    patched, _ = comfy.sd.load_lora_for_models(patchers[name][0], None, lora, 1.0, 0.0)

    assert len(natives) == family.trained_linears
    assert set(patched.patches) == _mapped(version, name, fmt, natives)
