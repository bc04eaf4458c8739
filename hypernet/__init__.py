"""LoRA.rar math: the hypernetwork, LoRA file normalisation and the factored merge (no ComfyUI imports)."""

__version__ = "0.2.0"
