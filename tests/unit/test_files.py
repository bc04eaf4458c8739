"""hypernet.files, the one place that hashes, reads state dicts from and atomically writes files."""

import os
import threading

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.files import atomic_file, file_sha256, read_state_dict

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2's "abc" example


def test_file_sha256_is_the_content_digest_and_sees_a_rewrite(tmp_path):
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == ABC_SHA256
    path.write_bytes(b"abcd")  # another size: the remembered digest no longer applies
    assert file_sha256(path) != ABC_SHA256


def test_file_sha256_sees_a_same_size_rewrite_with_the_old_mtime_set_back(tmp_path):
    """The merge node keys its cache and IS_CHANGED by this digest: a LoRA rewritten in place with the same size and
    its mtime restored (cp -p, rsync -t) gave the old file's digest, so the old merge was reused."""
    path = tmp_path / "lora.bin"
    path.write_bytes(b"abc")
    before = path.stat()
    assert file_sha256(path) == ABC_SHA256
    with open(path, "r+b") as handle:  # same inode, same size
        handle.write(b"xyz")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert file_sha256(path) != ABC_SHA256


def test_atomic_file_never_touches_the_process_umask(tmp_path, monkeypatch):
    """ComfyUI serves from several threads: setting the umask, even briefly, would race with their file writes."""
    umask = os.umask(0o022)
    os.umask(umask)

    def no_umask(*_):
        raise AssertionError("atomic_file called os.umask")

    monkeypatch.setattr(os, "umask", no_umask)
    with atomic_file(tmp_path / "out.bin") as temp:
        temp.write_bytes(b"data")
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_files_written_from_threads_at_once_all_land(tmp_path):
    def write(n: int) -> None:
        with atomic_file(tmp_path / "same.bin") as temp:
            temp.write_bytes(str(n).encode() * 1000)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.name for p in tmp_path.iterdir()] == ["same.bin"]
    assert len(set((tmp_path / "same.bin").read_bytes())) == 1


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth"])
def test_one_reader_for_safetensors_and_weights_only_pickles(tmp_path, name):
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, path)
    assert torch.equal(read_state_dict(path, "LoRA")["a.weight"], tensors["a.weight"])


def test_reader_errors_name_the_file_and_what_it_should_be(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(LoraRarError, match="list.pth: not a LoRA.rar hypernet: expected a dict of tensors"):
        read_state_dict(path, "LoRA.rar hypernet")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(LoraRarError, match="broken.safetensors: cannot read LoRA file"):
        read_state_dict(broken, "LoRA")


def test_a_writer_that_replaces_the_temp_file_still_gives_the_usual_permissions(tmp_path):
    """safetensors >= 0.8 writes its own 0o600 temp file and renames it over the path it is given."""
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_file(tmp_path / "out.bin") as temp:
        private = tmp_path / "private.tmp"
        private.write_bytes(b"data")
        os.chmod(private, 0o600)
        os.replace(private, temp)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask
