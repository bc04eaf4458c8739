"""Files on disk: content hashes and atomic writes (temp file in the same folder, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraRarError, LoraRarFileExists

_SHA256_CACHE: dict[tuple, str] = {}
# atomic_file's temp name is ".{name}." + 8 random characters + ".tmp": 14 bytes more than the name itself
_TEMP_NAME_EXTRA = 14
# control characters (NUL, CR, LF, ...), invisible format characters (bidi overrides), line/paragraph
# separators and lone surrogates: no file system or log line shows them for what they are
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content; remembered while its size, mtime and inode stay the same.

    The merge node fingerprints a file and then reads it: the cache keeps that to one pass over the bytes.
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        if len(_SHA256_CACHE) >= 64:
            _SHA256_CACHE.pop(next(iter(_SHA256_CACHE)))
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


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


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, move the finished file onto ``path``.

    The file gets the usual permissions (mkstemp makes 0600) and is flushed to disk before the rename.
    With overwrite=False an existing ``path`` is never replaced, even one that appears meanwhile
    (LoraRarFileExists). On any failure the temp file is removed and ``path`` is untouched.
    """
    path = check_target(path)
    if not overwrite and path.exists():
        raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # read-only folder, no permission, disk full: one line naming the file
        raise LoraRarError(f"{path}: cannot write the file ({exc.strerror or exc})") from None
    os.close(handle)
    try:
        yield Path(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)  # fails if the name was taken meanwhile, unlike a rename
            except FileExistsError:
                raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting") from None
                os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
