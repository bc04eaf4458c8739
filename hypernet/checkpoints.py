"""Finding, downloading and verifying hypernet checkpoints, and what each serves: ``resolve_hypernet``, the one
resolver the Hypernet Loader node, ``python -m hypernet merge`` and ``train --init`` all use.

Resolution order for a published name (weights/manifest.json): each search folder in turn (ComfyUI's ``lorarar``
model folders first, then the pack's ``weights/``), then a download from the manifest's pinned URL into the
download folder (huggingface_hub for ``hf://<repo>/<file>`` URLs, plain HTTPS otherwise). Every file found or
fetched must match the manifest's sha256. Any other choice is a file: a path, or a name in the search folders.

What a hypernet serves comes from the manifest for a published checkpoint (recognised by its sha256, whatever the
file is called) and from the file's own metadata for a trained one (hypernet/model.py: ``lorarar_model_classes``,
``lorarar_unet_layout``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .base_models import LAYOUTS, UNetLayout
from .errors import LoraRarError
from .files import atomic_file, file_sha256
from .model import LAYOUT_KEY, LoraRarHypernet, shown_model_classes

PACK_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = PACK_ROOT / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"


@dataclasses.dataclass(frozen=True)
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


def default_search_dirs() -> list[Path]:
    """Where the command line looks for hypernet files: $LORARAR_WEIGHTS_DIR, then the pack's weights/ (the node
    looks in ComfyUI's lorarar folders instead, then weights/)."""
    return [*env_weight_dirs(), WEIGHTS_DIR]


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


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedHypernet:
    """A hypernet as chosen (published name or file), loaded, with what it serves.

    model_classes: the ComfyUI model classes it is for: the manifest's for a published checkpoint, the file's
    metadata for a trained one; () when neither says. layout: the UNet layout of the LoRAs it merges: the published
    base model's, or the one a trained file records (else the published base model of its class); None when unknown.
    """

    name: str
    net: LoraRarHypernet
    model_classes: tuple[str, ...]
    layout: UNetLayout | None
    published: CheckpointInfo | None = None

    @property
    def trained(self) -> bool:
        """A file that says what it was trained for (its metadata names model classes)."""
        return self.published is None and bool(self.model_classes)

    def lora_layout(self, named: UNetLayout | None = None) -> UNetLayout | None:
        """The layout the command line reads the LoRAs with: ``named`` (--base), checked against what a trained file
        says it serves, as the node checks its model (LoraRarHypernet.check_fits); else the hypernet's own. None for a
        file that says nothing (a hand-made checkpoint): the caller's default."""
        classes = shown_model_classes(self.model_classes)
        if named is None:
            if self.trained and self.layout is None:
                raise LoraRarError(f"{self.name}: this hypernet was trained for {classes} models but its file records no "
                                   "readable UNet layout (lorarar_unet_layout, written since 0.2.0 by python -m hypernet "
                                   "train): train it again, or merge in ComfyUI, whose merge node reads the model")
            if self.trained:  # its widths against the layout it says it serves, as the node checks its model's
                self.net.check_fits(self.name, self.model_classes[0],
                                    {width for _, width, _ in self.layout.attention_blocks()})
            return self.layout
        if self.trained and self.layout is not None and _structure(named) != _structure(self.layout):
            raise LoraRarError(f"{self.name}: this hypernet was trained for {classes} models; --base {named.name} is "
                               f"another model: leave --base out (the file says its layout) or choose a hypernet "
                               f"trained for {named.name}")
        widths = {width for _, width, _ in named.attention_blocks()}
        self.net.check_fits(self.name, self.model_classes[0] if self.trained else named.name, widths)
        return named


def _structure(layout: UNetLayout) -> UNetLayout:
    """A layout without its name: two names of one UNet (the model class, a manifest name) compare equal."""
    return dataclasses.replace(layout, name="")


def published_layout(info: CheckpointInfo) -> UNetLayout:
    """The UNet layout of the LoRAs a published checkpoint merges: its base model's."""
    return LAYOUTS[info.base_model]


def resolve_hypernet(choice: str, search_dirs: list[Path], download_dir: Path = WEIGHTS_DIR,
                     manifest: dict[str, CheckpointInfo] | None = None) -> ResolvedHypernet:
    """Find (download, verify) and load the hypernet ``choice`` names, and say what it serves (the class docstring)."""
    manifest = manifest if manifest is not None else load_manifest()
    path = resolve_checkpoint(choice, search_dirs, download_dir, manifest)
    net = LoraRarHypernet.load(path)
    info = next((i for i in manifest.values() if i.sha256 == net.sha256), None)
    if info is not None:
        return ResolvedHypernet(choice, net, info.comfy_model_classes, published_layout(info), info)
    layout = net.training_metadata.get(LAYOUT_KEY)
    if layout is None:  # a file that names its classes only: the layout of the published base model of one of them
        layout = next((published_layout(i) for i in manifest.values()
                       if set(net.model_classes) & set(i.comfy_model_classes)), None)
    return ResolvedHypernet(choice, net, net.model_classes, layout)
