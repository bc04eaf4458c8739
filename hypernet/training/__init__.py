"""Training a LoRA.rar hypernetwork: the dataset, the loop, checkpoints and the output file; torch only, no
ComfyUI import.

- ``command``: ``python -m hypernet train`` and ``check-dataset`` (the one place that starts ComfyUI, through
  the adapter's nodes/adapter/training.py, after turning off ComfyUI's own argument parsing);
- ``dataset``: the dataset folder (docs/TRAINING.md), read and checked;
- ``recipe``: the training settings, the published recipe as defaults;
- ``trainer``: the loop (H gives every layer's coefficients, the ZipLoRA objective trains it);
- ``state``: checkpoints that resume exactly; ``distributed``: several processes through torchrun;
- ``output``: the trained H as a file the Hypernet Loader reads like a published one.

The base model's forward reaches the loop as a callable from the adapter (nodes/adapter/training.py), as
``ziplora_loss``'s ``denoise`` does. Nothing is imported here.
"""
