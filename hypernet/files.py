"""Files on disk: reading a state dict, content hashes and atomic writes (temp file in the same folder, fsync,
rename). LoRA files, hypernet checkpoints, saved merges and downloads all go through these functions."""

from __future__ import annotations

import hashlib
import os
import secrets
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import BoundedCache
from .errors import LoraRarError, LoraRarFileExists

if TYPE_CHECKING:  # torch is imported where a state dict is read: hashing and writing files do not need it
    import torch

_SHA256_CACHE: BoundedCache[str] = BoundedCache(64, "absolute path, size, mtime_ns, ctime_ns, inode")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # any other file is read as a torch pickle, weights_only=True
# atomic_file's temp name is ".{name}." + 8 random hex digits + ".tmp": 14 bytes more than the name itself
_TEMP_NAME_EXTRA = 14
# control characters (NUL, CR, LF, ...), invisible format characters (bidi overrides), line/paragraph
# separators and lone surrogates: no file system or log line shows them for what they are
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content; remembered while its size, mtime, ctime and inode stay the same.

    The merge node hashes a file for ComfyUI's IS_CHANGED and again when it reads it (for its cache key and
    the saved file's provenance): the memory keeps that to one hashing pass.
    """
    stat = os.stat(path)
    # ctime too: a rewrite in place that keeps the size and sets the old mtime back (cp -p, rsync -t, tar, a
    # coarse-clock file system) keeps all the rest, and no one can set ctime back
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    known = _SHA256_CACHE.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return _SHA256_CACHE.put(key, digest.hexdigest())


def forget_hashes() -> None:
    """Forget every remembered hash (a benchmark's cold run)."""
    _SHA256_CACHE.clear()


def read_state_dict(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch pickle loaded with weights_only=True (a ``state_dict``
    entry holding them is unwrapped), on the CPU.

    ``kind`` names what the file should be ("LoRA", "LoRA.rar hypernet") in the one-line LoraRarError raised
    for a file that cannot be read, a pickle holding more than tensors, or anything but a dict of tensors.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            return _tensors_only(load_file(str(path), device="cpu"), path, kind)
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise many types; the user needs one line
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "weights_only" in text or "Unsupported global" in text:
            reason = "a pickle holding more than plain tensors, refused (only weights_only=True loads)"
        raise LoraRarError(f"{path}: cannot read {kind} file ({reason}); is it truncated or not a .safetensors file?") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return _tensors_only(data, path, kind)


def _tensors_only(data: object, path: Path, kind: str) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraRarError(f"{path}: not a {kind}: expected a dict of tensors")
    return data


def check_name_characters(name: str) -> None:
    """Refuse a file name holding a character that would hide in a listing or split a log line (NUL, CR, LF, ...)."""
    bad = next((c for c in str(name) if unicodedata.category(c) in _UNSAFE_CATEGORIES), None)
    if bad is not None:
        raise LoraRarError(f"{str(name)!r}: the file name holds the control character U+{ord(bad):04X}; "
                           f"use a name of printable characters")


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder (or file) on the way up from ``path`` that exists."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(os.curdir)


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_target(path: str | Path) -> Path:
    """Refuse, before anything is written, a target atomic_file cannot write: a name with control characters,
    no file name, a name or path too long once the temp suffix is added, a folder, or a parent that is a file."""
    check_name_characters(str(path))
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise LoraRarError(f"{path}: no file name; give the name of the file to write")
    ancestor = _existing_ancestor(path)
    name_bytes, name_max = len(os.fsencode(path.name)), _limit(ancestor, "PC_NAME_MAX", 255)
    if name_bytes + _TEMP_NAME_EXTRA > name_max:
        raise LoraRarError(f"{path.name[:40]}...: file name of {name_bytes} bytes is too long for this file system "
                           f"(at most {name_max - _TEMP_NAME_EXTRA}); choose a shorter name")
    full_bytes, path_max = len(os.fsencode(os.path.abspath(path))), _limit(ancestor, "PC_PATH_MAX", 4096)
    if full_bytes + _TEMP_NAME_EXTRA >= path_max:
        raise LoraRarError(f"{path.name}: the full path of {full_bytes} bytes is too long for this file system "
                           f"(at most {path_max - _TEMP_NAME_EXTRA - 1}); choose a shorter folder or name")
    if os.path.isdir(path):
        raise LoraRarError(f"{path}: is a folder; give the name of the file to write inside it")
    if os.path.lexists(path) and not os.path.islink(path) and not os.path.isfile(path):
        # a device, FIFO or socket: replacing it with a regular file (as root, /dev/null) breaks the system
        raise LoraRarError(f"{path}: is not a regular file (a device, pipe or socket); choose a file to write")
    if not os.path.isdir(ancestor):
        raise LoraRarError(f"{path}: {ancestor} is a file, not a folder; choose another place to write")
    return path


def refuse_replacing(target: str | Path, inputs: dict[str, str]) -> None:
    """Refuse a target that is one of the inputs ({role: path}): the same file by path, symlink or hard link."""
    for role, source in inputs.items():
        try:
            same = os.path.samefile(target, source)
        except (OSError, ValueError):  # either file missing: they cannot be the same file
            same = False
        if same:
            raise LoraRarError(f"{target}: is the {role} of this merge ({source}); writing there would destroy "
                               f"an input, choose another file name")


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new empty file ``.{name}.<8 hex digits>.tmp`` beside ``path``, and the permission bits it was given.

    Why not mkstemp and a chmod to 0o666 less the umask: mkstemp creates 0o600, and the umask can only be read
    by setting it (os.umask), process-wide and racy in ComfyUI's multi-threaded server. os.open with mode
    0o666 lets the kernel apply the umask (and a folder's default ACL) as for any new file; the bits it chose
    are then read back from the file. O_EXCL makes the name ours, as mkstemp does.
    """
    for _ in range(100):
        temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            return temp, os.fstat(handle).st_mode & 0o777
        finally:
            os.close(handle)
    raise FileExistsError(f"no free temp name beside {path.name}")


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, move the finished file onto ``path``.

    The file gets the usual permissions (0o666 less the umask, see _create_temp) and is flushed to disk
    before the rename. With overwrite=False an existing ``path`` is never replaced, even one that appears
    meanwhile (LoraRarFileExists). On any failure the temp file is removed and ``path`` is untouched.
    """
    path = check_target(path)
    if not overwrite and path.exists():
        raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp, mode = _create_temp(path)
    except OSError as exc:  # read-only folder, no permission, disk full: one line naming the file
        raise LoraRarError(f"{path}: cannot write the file ({exc.strerror or exc})") from None
    try:
        yield temp
        with open(temp, "rb") as written:
            if os.fstat(written.fileno()).st_mode & 0o777 != mode:  # the writer replaced the file (safetensors
                os.fchmod(written.fileno(), mode)  # >= 0.8 writes its own 0o600 temp file and renames it)
            os.fsync(written.fileno())
        _move_into_place(temp, path, overwrite)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _move_into_place(temp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished temp file onto ``path``; without overwrite, never onto a file that exists."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails if the name was taken meanwhile, unlike a rename
    except FileExistsError:
        raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting") from None
        os.replace(temp, path)
