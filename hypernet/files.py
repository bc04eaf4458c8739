"""Files on disk: content hashes and atomic writes (temp file in the same folder, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraRarFileExists

_SHA256_CACHE: dict[tuple, str] = {}


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


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, move the finished file onto ``path``.

    The file gets the usual permissions (mkstemp makes 0600) and is flushed to disk before the rename.
    With overwrite=False an existing ``path`` is never replaced, even one that appears meanwhile
    (LoraRarFileExists). On any failure the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise LoraRarFileExists(f"{path}: file exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
