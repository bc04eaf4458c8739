"""``python -m hypernet`` (also ``torchrun ... -m hypernet``): the command line of hypernet/cli.py, run inside the
pack, imported once under PACK_NAME.

``train`` and ``check-dataset --base`` run the pack's ComfyUI adapter (nodes/training.py), which reaches hypernet/
through the pack (``from ..hypernet ...``). Were the command line the top-level ``hypernet`` package, every module
the adapter uses would be imported twice, under two names, with two LoraRarError classes. So the whole command runs
as the pack's own ``hypernet`` package; only this file and hypernet/__init__.py (the version) run under the top-level
name.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACK_NAME = "comfyui_lorarar"  # the pack's package name outside a ComfyUI server (ComfyUI names it after its folder)
PACK_ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """The pack (the repository folder) as the package PACK_NAME, once per process. Its __init__.py (the node
    registration ComfyUI runs) is not executed: importing ComfyUI's folder_paths before the training command has
    turned off ComfyUI's own argument parsing would parse this command's arguments. Submodules import as usual."""
    if PACK_NAME not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACK_NAME, None, is_package=True)
        spec.submodule_search_locations = [str(PACK_ROOT)]
        sys.modules[PACK_NAME] = importlib.util.module_from_spec(spec)
    return sys.modules[PACK_NAME]


if __name__ == "__main__":
    sys.exit(importlib.import_module(f"{import_pack().__name__}.hypernet.cli").main())
