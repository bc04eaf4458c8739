"""The published hypernets a developer checkout already holds: the folder they are in and their file names.

The folder is $LORARAR_SHARED_WEIGHTS, else ``../shared/weights`` beside the checkout; file names come from
weights/manifest.json (hypernet.checkpoints.load_manifest), never spelled out by the tests, bench or scripts.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypernet.checkpoints import load_manifest

REPO = Path(__file__).resolve().parents[1]


def shared_weights_dir() -> Path:
    """Where the published hypernets are kept for the tests, the bench and the scripts."""
    return Path(os.environ.get("LORARAR_SHARED_WEIGHTS", REPO.parent / "shared" / "weights"))


def hypernet_file(name: str = "sdxl") -> str:
    """The file name of a published hypernet by its manifest name ("sdxl", "koala-700m")."""
    return load_manifest()[name].file


def shared_hypernet(name: str = "sdxl", folder: Path | None = None) -> Path:
    """The path of a published hypernet in ``folder`` (default: shared_weights_dir())."""
    return Path(folder or shared_weights_dir()) / hypernet_file(name)
