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


def _fake_host(tmp_path, link_to):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "custom_nodes" / "ComfyUI-LoRA.rar").symlink_to(link_to, target_is_directory=True)
    server = ComfyServer(comfy=comfy, test_nodes=True)
    server.tmp = tmp_path / "lorarar-comfy-ours"
    server.tmp.mkdir()
    server._redirect_pack()
    return server


def test_the_server_runs_this_checkouts_pack_when_the_hosts_link_names_another(tmp_path):
    """A worktree's tests must exercise the worktree's nodes, not those of the checkout that installed the host."""
    from devkit.comfy_server import REPO, TEST_NODES

    (tmp_path / "other-checkout").mkdir()
    server = _fake_host(tmp_path, tmp_path / "other-checkout")
    assert (server.tmp / "pack" / "lorarar_pack_under_test").resolve() == REPO.resolve()
    assert server.command()[-4:] == ["--disable-all-custom-nodes", "--whitelist-custom-nodes",
                                     "lorarar_pack_under_test", "lorarar_test_nodes"]
    assert server._folders()["custom_nodes"] == [TEST_NODES, server.tmp / "pack"]


def test_the_hosts_own_link_is_used_when_it_names_this_checkout(tmp_path):
    from devkit.comfy_server import REPO

    server = _fake_host(tmp_path, REPO)
    assert "--disable-all-custom-nodes" not in server.command() and not (server.tmp / "pack").exists()
