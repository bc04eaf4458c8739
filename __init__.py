"""ComfyUI-LoRA.rar: merge a subject LoRA and a style LoRA with the LoRA.rar hypernetwork.

The node classes are registered here, one import per node file (nodes/*.py), so a node is three modules from
ComfyUI's own import: this file, its node file, the adapter (nodes/adapter/).
"""

try:
    import folder_paths  # noqa: F401  (exists only inside a ComfyUI process)
except ImportError:  # imported outside ComfyUI (pytest collecting the repo): no nodes to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes.coefficients import LoraRarCoefficientPicture
    from .nodes.compare import LoraRarCompare
    from .nodes.evaluate import LoraRarEvaluate
    from .nodes.loader import LoraRarHypernetLoader
    from .nodes.merge import LoraRarMerge
    from .nodes.save import LoraRarSaveMergedLora
    from .nodes.ziplora import LoraRarZipLora

    NODE_CLASS_MAPPINGS = {
        "LoraRarHypernetLoader": LoraRarHypernetLoader,
        "LoraRarMerge": LoraRarMerge,
        "LoraRarSaveMergedLora": LoraRarSaveMergedLora,
        "LoraRarEvaluate": LoraRarEvaluate,
        "LoraRarCoefficientPicture": LoraRarCoefficientPicture,
        "LoraRarCompare": LoraRarCompare,
        "LoraRarZipLora": LoraRarZipLora,
    }
    NODE_DISPLAY_NAME_MAPPINGS = {
        "LoraRarHypernetLoader": "LoRA.rar Hypernet Loader",
        "LoraRarMerge": "LoRA.rar Merge (subject + style)",
        "LoraRarSaveMergedLora": "LoRA.rar Save Merged LoRA",
        "LoraRarEvaluate": "LoRA.rar Evaluate (MLLM judge)",
        "LoraRarCoefficientPicture": "LoRA.rar Coefficient Picture (subject vs style per block)",
        "LoraRarCompare": "LoRA.rar Compare Methods (grid)",
        "LoraRarZipLora": "LoRA.rar ZipLoRA (optimise merge)",
    }

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
