"""Training a LoRA.rar hypernetwork: the dataset, the loop, checkpoints and the output file.

torch only, no ComfyUI import: the base model's forward reaches the loop as a callable from the adapter
(nodes/adapter/training.py), as ``ziplora_loss``'s ``denoise`` does.
"""
