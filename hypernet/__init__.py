"""Everything of the pack that is not ComfyUI: torch only, runnable and testable without a host.

- LoRA files: ``files`` (reading, hashes, atomic writes), ``keys`` (kohya names), ``lora_io`` (layer factors),
  ``model_keys`` (layers matched to a model through its host's key map, given as plain data), ``base_models``;
- merging: ``merge`` (entry points, report, result), ``pipeline`` (plan, then compute), ``methods/`` (one module
  per merge method, every kind), ``lowrank`` (the arithmetic every rule ends in), ``runtime`` (what a method
  adds in the layers' forwards while the model runs), ``ziplora`` (the factored per-pair optimisation),
  ``any_family`` (the CLI's name-matched merge);
- the hypernetwork: ``model`` (H and its files), ``checkpoints`` (the published ones: find, download, verify);
- ``training/``: the dataset, the loop, checkpoints and the output of ``python -m hypernet train``;
- ``evaluation/``: the paper's MLLM-judge protocol, ranking and its files; ``comparison``: the methods' grid;
- pictures: ``coefficients``, ``loss_curve``, ``plotting``; shared: ``errors``, ``cache``;
- ``cli`` / ``__main__``: ``python -m hypernet merge | evaluate | train | check-dataset``.

The host's side (ComfyUI's models, sampling, folders) is nodes/adapter/, the only code that imports ComfyUI.
"""

__version__ = "0.2.0"
