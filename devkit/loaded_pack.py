"""The pack's modules as an in-process ComfyUI loaded it (under the package name ComfyUI gave it), for tests,
benchmarks and the GPU check that call the adapter directly."""

from __future__ import annotations

import importlib
from types import ModuleType


def pack_module(comfy_nodes: ModuleType, dotted: str) -> ModuleType:
    """``pack_module(nodes, "nodes.adapter")``: that module of the pack ComfyUI's ``nodes`` module registered."""
    root = comfy_nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"].__module__.rsplit(".nodes.merge", 1)[0]
    return importlib.import_module(f"{root}.{dotted}")
