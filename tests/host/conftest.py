"""A real ComfyUI imported in-process, with this pack loaded the way the server loads it."""

import sys
from pathlib import Path

import pytest

from devkit import synthetic_models
from devkit.comfy_server import load_pack_in_process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def comfy_host(shared_weights, tmp_path_factory):
    """(nodes module, folder_paths, loras dir) of an in-process ComfyUI with the pack registered."""
    root = synthetic_models.comfy_root()
    if not (root / "main.py").is_file():
        pytest.fail(f"ComfyUI host missing at {root}: run scripts/setup_host.sh")
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (before nodes: nodes.py puts comfy/ first on sys.path)
    import folder_paths
    import nodes

    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.add_model_folder_path("lorarar", str(shared_weights))
    load_pack_in_process(nodes, folder_paths, comfy.cli_args.args, root, tmp_path_factory.mktemp("custom_nodes"))
    missing = [n for n in ("LoraRarHypernetLoader", "LoraRarMerge", "LoraRarSaveMergedLora") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        pytest.fail(f"the pack did not load into ComfyUI (missing {missing}); see the log above")
    return nodes, folder_paths, loras


@pytest.fixture(scope="session")
def synthetic_model(comfy_host):
    """(MODEL, CLIP) of the synthetic SDXL-family checkpoint, loaded by ComfyUI's own loader."""
    import comfy.sd

    models = synthetic_models.ensure_models()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(synthetic_models.checkpoint_path(models)), output_vae=False, output_clip=True)
    return model, clip


@pytest.fixture(scope="session")
def layout(synthetic_model):
    """The synthetic model's UNet layout, as ComfyUI detected it."""
    from hypernet.base_models import UNetLayout

    model, _ = synthetic_model
    return UNetLayout.from_unet_config("synthetic", model.model.model_config.unet_config)


class _DitFloat32(dict):
    """family name -> ModelPatcher of the synthetic DiT (devkit/synthetic_dit.py) with float32 weights, loaded on
    first use."""

    def __missing__(self, name: str):
        from devkit import synthetic_dit

        family = synthetic_dit.ALL_FAMILIES[name]
        root = synthetic_dit.ensure_dit(families=[name], in_process=True)
        self[name] = synthetic_dit.load_patcher(family, root, dtype="float32")[0]
        return self[name]


_DIT_FLOAT32 = _DitFloat32()
_LAST_DIT_FLOAT32_USER: list[str] = []  # node id of the last collected test that asks for dit_float32


@pytest.fixture(scope="session")
def dit_float32(comfy_host):
    """family name -> the synthetic DiT's ModelPatcher in float32 (the exact reference the float64 goldens compare
    with), loaded once per session and shared by the modules that need it (test_dit_merge, test_klora_dit): Z-Image
    (3840 wide, a width the host's detection fixes) alone is 3.6 GB in float32 and one of the slowest loads. Emptied
    after the last test that asks for it (pytest_runtest_teardown), so later modules do not carry the gigabytes."""
    return _DIT_FLOAT32


def pytest_collection_modifyitems(items):
    users = [item.nodeid for item in items if "dit_float32" in getattr(item, "fixturenames", ())]
    _LAST_DIT_FLOAT32_USER[:] = users[-1:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if _DIT_FLOAT32 and [item.nodeid] == _LAST_DIT_FLOAT32_USER:
        import gc

        import comfy.model_management

        comfy.model_management.unload_all_models()
        _DIT_FLOAT32.clear()
        gc.collect()
