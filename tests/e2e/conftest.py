"""One real ComfyUI server for the pack's end-to-end tests, with synthetic models and test LoRAs."""

import pytest

from hypernet.base_models import UNetLayout
from devkit import synthetic_models
from devkit.comfy_server import ComfyServer
from devkit.loras import SD15, random_lora, write_lora

SUBJECT, STYLE = "e2e_subject_kohya.safetensors", "e2e_style_reference.safetensors"
SD15_LORA = "e2e_sd15_subject.safetensors"
JUDGE_KEY = "sk-e2e-secret-0123456789"  # in the server's environment only: must never show up anywhere else


@pytest.fixture(scope="session")
def synthetic_layout() -> UNetLayout:
    return UNetLayout.from_unet_config("synthetic", synthetic_models.UNET_CONFIG)


@pytest.fixture(scope="session")
def hypernet_folder(tmp_path_factory):
    """A second lorarar folder of the server (after ../shared/weights), for hypernet files a test writes."""
    return tmp_path_factory.mktemp("e2e_hypernets")


@pytest.fixture(scope="session")
def pack_server(tmp_path_factory, shared_weights, synthetic_layout, hypernet_folder):
    """(server, loras folder): the pack loaded, hypernets from ../shared/weights (and hypernet_folder) as lorarar
    folders."""
    models = synthetic_models.ensure_models()
    loras = tmp_path_factory.mktemp("e2e_loras")
    write_lora(loras / SUBJECT, random_lora(synthetic_layout, rank=8, seed=101, alpha=8.0))
    write_lora(loras / STYLE, random_lora(synthetic_layout, rank=4, seed=102, fmt="reference"))
    write_lora(loras / SD15_LORA, random_lora(SD15, rank=4, seed=103))
    with ComfyServer(models, folders={"loras": loras, "lorarar": [shared_weights, hypernet_folder]},
                     env={"LORARAR_JUDGE_API_KEY": JUDGE_KEY}) as server:
        yield server, loras
