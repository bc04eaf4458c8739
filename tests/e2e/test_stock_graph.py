"""A stock ComfyUI graph runs end to end on the real host with the synthetic SDXL-family models.

This proves the harness itself (host install, synthetic checkpoint + TAESDXL, server helper),
independently of the pack's own nodes.
"""

from __future__ import annotations

import pytest

from devkit.comfy_server import ComfyServer, PromptRejected
from devkit.synthetic_models import CHECKPOINT_NAME, ensure_models

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stock_graph(ckpt_name: str = CHECKPOINT_NAME, prefix: str = "lorarar_stock",
                seed: int = 1, steps: int = 1) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage 256 -> KSampler (euler)
    -> VAEDecode (VAELoader taesdxl) -> SaveImage, in API format."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def server():
    models = ensure_models()
    with ComfyServer(models) as srv:
        yield srv


def _assert_png_written(srv: ComfyServer, entry: dict) -> None:
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = srv.output_files(entry)
    assert len(files) == 1, entry["outputs"]
    png = files[0]
    assert png.is_file(), png
    assert png.parent == srv.output_dir
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_models_are_offered(server):
    ckpts = server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert CHECKPOINT_NAME in ckpts
    vaes = server.object_info("VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert "taesdxl" in vaes


def test_stock_graph_writes_png(server):
    entry = server.wait(server.queue_prompt(stock_graph(steps=2)), timeout=300, check=True)
    _assert_png_written(server, entry)


def test_missing_checkpoint_is_rejected_then_server_still_runs(server):
    with pytest.raises(PromptRejected) as info:
        server.queue_prompt(stock_graph(ckpt_name="does-not-exist.safetensors"))
    err = info.value
    assert err.status == 400
    assert "1" in err.node_errors, err.body
    messages = " ".join(e.get("message", "") + " " + e.get("details", "")
                        for e in err.node_errors["1"]["errors"])
    assert "ckpt_name" in messages and "does-not-exist.safetensors" in messages, err.node_errors

    entry = server.wait(server.queue_prompt(stock_graph(prefix="lorarar_after_error", seed=2)),
                        timeout=300, check=True)
    _assert_png_written(server, entry)
