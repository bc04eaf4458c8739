"""ComfyUI-LoRA.rar: merge a subject LoRA and a style LoRA with the LoRA.rar hypernetwork."""

try:
    import folder_paths  # noqa: F401  (exists only inside a ComfyUI process)
except ImportError:  # imported outside ComfyUI (pytest collecting the repo): no nodes to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
