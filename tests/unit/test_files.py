"""hypernet.files, the one place that hashes, reads state dicts from and atomically writes files: and the targets it
refuses before writing (control characters, names too long, folders, an input of the merge), each in one line."""

import os
import threading

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.files import atomic_file, check_target, file_sha256, read_state_dict, refuse_replacing
from hypernet.lora_io import save_lora
from tests.unit.test_bad_input import one_line_error

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


# --- files: targets that cannot be written, and inputs never replaced


@pytest.mark.parametrize("name", ["bad\nname.safetensors", "bad\rname.safetensors", "bad\x00name.safetensors",
                                  "tab\tname.safetensors", "bell\x07.safetensors", "rtl\u202eexe.safetensors",
                                  "line\u2028sep.safetensors", "del\x7f.safetensors"])
def test_control_characters_in_a_target_name_are_refused_before_writing(tmp_path, name):
    text = one_line_error(lambda: save_lora(tmp_path / name, {"a": torch.zeros(1)}, {}))
    assert "control character" in text
    assert list(tmp_path.iterdir()) == []


def test_names_too_long_once_the_temp_suffix_is_added(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = "a" * (name_max - 14 - len(".safetensors")) + ".safetensors"
    save_lora(tmp_path / fits, {"a": torch.zeros(1)}, {})
    too_long = "b" * (name_max - 13 - len(".safetensors")) + ".safetensors"  # fits alone, not with the temp suffix
    text = one_line_error(lambda: save_lora(tmp_path / too_long, {"a": torch.zeros(1)}, {}))
    assert "too long" in text and len(text) < 400
    deep = tmp_path.joinpath(*(["d" * 200] * 25), "x.safetensors")  # each part fits, the whole path does not
    assert "too long" in one_line_error(lambda: check_target(deep))
    assert sorted(p.name for p in tmp_path.iterdir()) == [fits]


def test_no_file_name_a_folder_or_a_file_as_parent(tmp_path):
    (tmp_path / "file.safetensors").write_bytes(b"x")
    for target, expected in ((tmp_path, "is a folder"), (str(tmp_path) + "/.", "is a folder"), (tmp_path / "..", "no file name"),
                             (tmp_path / "new" / "..", "no file name"),
                             (tmp_path / "file.safetensors" / "x.safetensors", "is a file, not a folder"),
                             (tmp_path / "file.safetensors" / "deeper" / "x.safetensors", "is a file, not a folder")):
        assert expected in one_line_error(lambda: save_lora(target, {"a": torch.zeros(1)}, {}, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.safetensors"]


def test_unwritable_folder_is_one_line(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        text = one_line_error(lambda: save_lora(folder / "x.safetensors", {"a": torch.zeros(1)}, {}))
        assert "x.safetensors: cannot write the file" in text
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("link", ["same", "hard", "symlink", "dotted"])
def test_an_input_is_never_replaced_even_with_overwrite(tmp_path, link):
    source = tmp_path / "subject.safetensors"
    source.write_bytes(b"the user's LoRA")
    target = {"same": source, "hard": tmp_path / "hard.safetensors", "symlink": tmp_path / "sym.safetensors",
              "dotted": tmp_path / "sub" / ".." / "subject.safetensors"}[link]
    (tmp_path / "sub").mkdir()
    if link == "hard":
        os.link(source, target)
    elif link == "symlink":
        target.symlink_to(source)
    text = one_line_error(lambda: save_lora(target, {"a": torch.zeros(1)}, {}, overwrite=True,
                                            protect={"subject LoRA": str(source)}))
    assert "is the subject LoRA of this merge" in text
    assert source.read_bytes() == b"the user's LoRA"
    refuse_replacing(tmp_path / "other.safetensors", {"subject LoRA": str(source)})  # a new file is fine


def test_atomic_file_checks_before_creating_anything(tmp_path):
    with pytest.raises(LoraRarError):
        with atomic_file(tmp_path / "a\nb"):
            pass
    assert list(tmp_path.iterdir()) == []
