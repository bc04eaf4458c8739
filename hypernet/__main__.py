"""``python -m hypernet`` (also ``torchrun ... -m hypernet``): the command line of hypernet/cli.py, run inside the
pack, imported once under PACK_NAME.

``train`` and ``check-dataset --base`` run the pack's ComfyUI adapter (nodes/training.py), which reaches hypernet/
through the pack (``from ..hypernet ...``). Were the command line the top-level ``hypernet`` package, every module
the adapter uses would be imported twice, under two names, with two LoraRarError classes. So the whole command runs
as the pack's own ``hypernet`` package; only this file and hypernet/__init__.py (the version) run under the top-level
name.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

PACK_NAME = "comfyui_lorarar"  # the pack's package name outside a ComfyUI server (ComfyUI names it after its folder)
PACK_ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """The pack (the repository folder) as the package PACK_NAME, imported once per process. Outside ComfyUI its
    __init__ registers no nodes; nodes/training.py is imported from it once ComfyUI is on sys.path."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = pack
        spec.loader.exec_module(pack)
    return sys.modules[PACK_NAME]


if __name__ == "__main__":
    sys.exit(importlib.import_module(f"{import_pack().__name__}.hypernet.cli").main())
