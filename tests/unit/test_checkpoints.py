"""Finding and downloading the published hypernets, against a real local HTTP server."""

import dataclasses
import http.server
import socket
import threading
from pathlib import Path

import pytest

from hypernet.checkpoints import load_manifest, resolve_checkpoint
from hypernet.errors import LoraRarError
from hypernet.files import file_sha256
from devkit.weights import hypernet_file

REPO = Path(__file__).resolve().parents[2]
SDXL_FILE, KOALA_FILE = hypernet_file("sdxl"), hypernet_file("koala-700m")


@pytest.fixture
def http_server(shared_weights):
    """Serves the published hypernets' folder (shared_weights) on a free loopback port; records the requested paths."""
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(shared_weights), **kwargs)

        def log_message(self, *args):
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


def local_manifest(base_url):
    return {name: dataclasses.replace(info, url=f"{base_url}/{info.file}") for name, info in load_manifest().items()}


def test_manifest_pins_upstream_commit_and_matches_the_published_files(shared_weights):
    for info in load_manifest().values():
        assert "/raw/9f3ca6db1d86e29a6933050719a6456eb3db13e8/models/" in info.url
        assert file_sha256(shared_weights / info.file) == info.sha256
        assert info.license == "CC BY-NC-SA 4.0"


def test_download_once_then_reuse(http_server, tmp_path):
    base_url, requested = http_server
    manifest = local_manifest(base_url)
    first = resolve_checkpoint("koala-700m", [tmp_path / "empty"], tmp_path / "cache", manifest)
    again = resolve_checkpoint("koala-700m", [tmp_path / "empty"], tmp_path / "cache", manifest)
    assert first == again == tmp_path / "cache" / KOALA_FILE
    assert requested == [f"/{KOALA_FILE}"]
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_search_folders_come_before_download(http_server, shared_weights, tmp_path):
    base_url, requested = http_server
    path = resolve_checkpoint("sdxl", [shared_weights], tmp_path / "cache", local_manifest(base_url))
    assert path == shared_weights / SDXL_FILE and requested == []


def test_wrong_sha256_is_refused_and_removed(http_server, tmp_path):
    base_url, _ = http_server
    manifest = local_manifest(base_url)
    manifest["sdxl"] = dataclasses.replace(manifest["sdxl"], url=f"{base_url}/{KOALA_FILE}")
    with pytest.raises(LoraRarError, match="downloaded file has sha256"):
        resolve_checkpoint("sdxl", [], tmp_path / "cache", manifest)
    assert not list((tmp_path / "cache").iterdir())


def test_offline_error_says_where_to_put_the_file(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manifest = local_manifest(f"http://127.0.0.1:{port}")
    with pytest.raises(LoraRarError) as error:
        resolve_checkpoint("sdxl", [tmp_path / "lorarar"], tmp_path / "cache", manifest, timeout=5)
    message = str(error.value)
    assert "\n" not in message and "could not download" in message
    assert str(tmp_path / "lorarar") in message and manifest["sdxl"].sha256 in message


def test_a_corrupt_local_copy_is_reported(tmp_path):
    folder = tmp_path / "lorarar"
    folder.mkdir()
    (folder / SDXL_FILE).write_bytes(b"not the checkpoint")
    with pytest.raises(LoraRarError, match="does not match the published sdxl hypernet"):
        resolve_checkpoint("sdxl", [folder], tmp_path / "cache", allow_download=False)


HUB_CLIENT = f"""
import dataclasses, pathlib, sys
from hypernet.checkpoints import load_manifest, resolve_checkpoint
manifest = load_manifest()
manifest["sdxl"] = dataclasses.replace(manifest["sdxl"], url="hf://lorarar-test/hypernets@v1/sdxl/{SDXL_FILE}")
print(resolve_checkpoint("sdxl", [], pathlib.Path(sys.argv[1]), manifest))
"""


def test_hub_urls_download_through_huggingface_hub(shared_weights, tmp_path):
    """hf:// URLs go through huggingface_hub, here against a local server standing in for the hub."""
    import os
    import subprocess
    import sys

    data = (shared_weights / SDXL_FILE).read_bytes()
    requested = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self):
            requested.append((self.command, self.path))
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{file_sha256(shared_weights / SDXL_FILE)}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.end_headers()

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            self._headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0",
               PYTHONPATH=str(REPO))
    try:
        result = subprocess.run([sys.executable, "-c", HUB_CLIENT, str(tmp_path / "cache")], env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(tmp_path / "cache" / SDXL_FILE)
    assert ("GET", f"/lorarar-test/hypernets/resolve/v1/sdxl/{SDXL_FILE}") in requested


def test_auto_picks_the_published_hypernet_by_comfyui_model_class():
    from hypernet.checkpoints import for_model_class

    assert for_model_class("SDXL").name == "sdxl" and for_model_class("Segmind_Vega").name == "sdxl"
    assert for_model_class("KOALA_700M").name == "koala-700m"
    with pytest.raises(LoraRarError, match="no published LoRA.rar hypernet for Flux models"):
        for_model_class("Flux")


def test_one_resolver_says_what_a_published_or_a_trained_hypernet_serves(shared_weights, tmp_path):
    """resolve_hypernet (the loader node, the merge command and train --init): the manifest for a published checkpoint,
    recognised by its sha256 under any file name; the file's metadata for a trained one."""
    import shutil

    from devkit.loras import SD15
    from hypernet.base_models import KOALA_700M, SDXL
    from hypernet.checkpoints import resolve_hypernet
    from hypernet.model import new_hypernet, save_hypernet

    published = resolve_hypernet("sdxl", [shared_weights], tmp_path)
    assert published.layout == SDXL and "SDXL" in published.model_classes and not published.trained
    renamed = shutil.copyfile(shared_weights / KOALA_FILE, tmp_path / "mine.pth")
    koala = resolve_hypernet(str(renamed), [])
    assert koala.layout == KOALA_700M and koala.published.name == "koala-700m"
    assert koala.lora_layout(SDXL) == SDXL  # a published one serves every model of its widths, as the node allows

    trained = save_hypernet(new_hypernet([320, 640, 1280], hidden=8), tmp_path / "sd15.safetensors",
                            {"lorarar_model_classes": ["SD15"], "lorarar_unet_layout": SD15})
    sd15 = resolve_hypernet("sd15.safetensors", [tmp_path])  # a name in a search folder
    assert sd15.trained and sd15.model_classes == ("SD15",) and sd15.layout == SD15 and sd15.lora_layout() == SD15
    with pytest.raises(LoraRarError, match=r"^sd15\.safetensors: this hypernet was trained for SD15 models; --base sdxl "
                                           r"is another model"):
        sd15.lora_layout(SDXL)
    same = dataclasses.replace(SD15, name="sd15 by another name")  # a layout is compared by structure, not name
    assert resolve_hypernet(str(trained), []).lora_layout(same) is same

    sdxl_class = save_hypernet(new_hypernet([640, 1280], hidden=8), tmp_path / "pony.safetensors",
                               {"lorarar_model_classes": ["SDXL"]})  # no layout recorded: its class's published one
    assert resolve_hypernet(str(sdxl_class), []).lora_layout() == SDXL
    older = save_hypernet(new_hypernet([320, 640, 1280], hidden=8), tmp_path / "old.safetensors",
                          {"lorarar_model_classes": ["SD15"]})
    with pytest.raises(LoraRarError, match=r"old\.safetensors: this hypernet was trained for SD15 models but its file "
                                           r"records no readable UNet layout"):
        resolve_hypernet(str(older), []).lora_layout()


def test_a_trained_file_whose_layout_has_widths_its_tensors_lack_is_refused_without_base(tmp_path):
    """The CLI without --base takes the layout the file records: a file saying SDXL (widths 640 and 1280) with an
    input layer for 640 only merged, every 1280-wide layer summed, where the node and --base sdxl refuse it."""
    from hypernet.base_models import SDXL
    from hypernet.checkpoints import resolve_hypernet
    from hypernet.model import new_hypernet, save_hypernet

    path = save_hypernet(new_hypernet([640], hidden=8), tmp_path / "half.safetensors",
                         {"lorarar_model_classes": ["SDXL"], "lorarar_unet_layout": SDXL})
    resolved = resolve_hypernet(str(path), [])
    for named in (None, SDXL):
        with pytest.raises(LoraRarError, match=r"half\.safetensors: this hypernet has input layers for attention "
                                               r"widths 640; this SDXL model has attention widths 640, 1280"):
            resolved.lora_layout(named)
