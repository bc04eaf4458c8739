"""The test harness never talks to a ComfyUI server it did not start."""

import socket

import pytest

from devkit.comfy_server import ComfyServer, ComfyServerError


def test_a_taken_port_is_an_error_not_a_silent_reuse():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ComfyServerError, match=f"port {port} is taken"):
            ComfyServer(port=port).start()


def test_only_a_server_reporting_our_own_argv_counts_as_ready(tmp_path):
    server = ComfyServer()
    server.tmp = tmp_path / "lorarar-comfy-ours"
    ours = {"system": {"argv": ["main.py", "--temp-directory", str(server.tmp)]}}
    someone_else = {"system": {"argv": ["main.py", "--temp-directory", "/tmp/lorarar-comfy-theirs"]}}
    assert server._is_ours(ours) and not server._is_ours(someone_else) and not server._is_ours("not json")
