"""Finding, downloading and verifying the published hypernet checkpoints (weights/manifest.json).

Resolution order for a named checkpoint: each search folder in turn (ComfyUI's ``lorarar`` model
folders first, then the pack's ``weights/``), then a download from the manifest's pinned URL into the
download folder (huggingface_hub for ``hf://<repo>/<file>`` URLs, plain HTTPS otherwise). Every file
found or fetched must match the manifest's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraRarError
from .files import atomic_file, file_sha256

PACK_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = PACK_ROOT / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    file: str
    url: str
    sha256: str
    bytes: int
    base_model: str
    comfy_model_classes: tuple[str, ...]
    license: str
    attribution: str


def env_weight_dirs() -> list[Path]:
    """Folders named in $LORARAR_WEIGHTS_DIR (separated by os.pathsep) that hold hypernet files."""
    return [Path(p) for p in os.environ.get("LORARAR_WEIGHTS_DIR", "").split(os.pathsep) if p]


def load_manifest(path: str | Path = MANIFEST_PATH) -> dict[str, CheckpointInfo]:
    data = json.loads(Path(path).read_text())
    entries = {}
    for entry in data["hypernets"]:
        entry = dict(entry, comfy_model_classes=tuple(entry.get("comfy_model_classes", ())))
        entries[entry["name"]] = CheckpointInfo(**entry)
    return entries


def for_model_class(model_class: str, manifest: dict[str, CheckpointInfo] | None = None) -> CheckpointInfo:
    """The published checkpoint serving a ComfyUI model class (``type(model.model_config).__name__``)."""
    manifest = manifest or load_manifest()
    for info in manifest.values():
        if model_class in info.comfy_model_classes:
            return info
    served = sorted(c for info in manifest.values() for c in info.comfy_model_classes)
    raise LoraRarError(
        f"no published LoRA.rar hypernet for {model_class} models (published for: {', '.join(served)}); "
        f"choose a hypernet file trained for {model_class} in the loader (README: 'Other model families'), "
        f"or use method direct, np-lora or k-lora")


def _download(url: str, target: Path, timeout: float) -> None:
    """Fetch url into target (atomically); raises OSError or urllib/huggingface_hub errors on failure."""
    if url.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        # hf://<owner>/<name>[@<revision>]/<path in the repository>
        owner, name, *path = url[len("hf://"):].split("/")
        name, _, revision = name.partition("@")
        cached = hf_hub_download(repo_id=f"{owner}/{name}", filename="/".join(path), revision=revision or None)
        with atomic_file(target) as temp:
            shutil.copyfile(cached, temp)
        return
    request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-LoRA.rar"})
    with atomic_file(target) as temp, open(temp, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
        shutil.copyfileobj(response, out, 1 << 20)


def resolve_checkpoint(
    name: str,
    search_dirs: list[Path],
    download_dir: Path = WEIGHTS_DIR,
    manifest: dict[str, CheckpointInfo] | None = None,
    allow_download: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Path of a verified checkpoint for a manifest name, or of a user's own file (a path or a file name)."""
    manifest = manifest if manifest is not None else load_manifest()
    info = manifest.get(name)
    if info is None:
        candidate = Path(name)
        if candidate.is_file():
            return candidate
        for folder in search_dirs:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
        raise LoraRarError(f"{name}: hypernet not found (known names: {', '.join(manifest)}; or give a file path)")

    folders = list(dict.fromkeys(Path(d) for d in [*search_dirs, download_dir]))
    for folder in folders:
        path = Path(folder) / info.file
        if path.is_file():
            size = path.stat().st_size
            digest = file_sha256(path) if size == info.bytes else None  # a wrong size needs no hashing
            if digest != info.sha256:
                found = f"sha256 {digest[:12]}..." if digest else f"{size} bytes, not {info.bytes},"
                raise LoraRarError(f"{path}: {found} does not match the published {info.name} hypernet "
                                   f"(sha256 {info.sha256[:12]}...); delete the file to download it again")
            return path

    target = Path(download_dir) / info.file
    where = ", ".join(str(d) for d in folders)
    if not allow_download:
        raise LoraRarError(f"{info.file}: hypernet not found; download {info.url} (sha256 {info.sha256}) into one of: {where}")
    try:
        _download(info.url, target, timeout)
    except Exception as exc:  # network errors come in many types; the user needs what to do next
        raise LoraRarError(
            f"{info.file}: could not download the {info.name} hypernet from {info.url} ({exc}); "
            f"download it by hand (sha256 {info.sha256}) into one of: {where}") from None
    digest = file_sha256(target)
    if digest != info.sha256:
        target.unlink()
        raise LoraRarError(f"{info.url}: downloaded file has sha256 {digest[:12]}..., expected {info.sha256[:12]}...; removed it")
    return target


def load_hypernet(choice: str, search_dirs: list[Path], download_dir: Path = WEIGHTS_DIR,
                  manifest: dict[str, CheckpointInfo] | None = None):
    """Resolve and load a hypernet; returns (LoraRarHypernet, base-model layout or None for unknown files)."""
    from .base_models import LAYOUTS
    from .model import LoraRarHypernet

    manifest = manifest if manifest is not None else load_manifest()
    path = resolve_checkpoint(choice, search_dirs, download_dir, manifest)
    hypernet = LoraRarHypernet.load(path)
    info = next((i for i in manifest.values() if i.sha256 == hypernet.sha256), None)
    return hypernet, (LAYOUTS[info.base_model] if info else None)
