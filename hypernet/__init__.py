"""Everything of the pack that is not ComfyUI: torch only, runnable and testable without a host. It merges, and it
also trains hypernetworks, evaluates merges with a multimodal judge and compares the methods.

- LoRA layers and files: ``layers`` (the layer types every stage passes, the two sides of a merge), ``names``
  (what a tensor key or a canonical name says without a layout: suffix roles, attention roles), ``keys`` (kohya
  canonical names for a UNet layout), ``tensors`` (one layer's tensors <-> a layer: dtype, shape and finite
  rules), ``lora_io`` (LoRA files read and written), ``model_keys`` (layers matched to a model through its host's
  key map, given as plain data), ``files`` (reading, hashes, atomic writes), ``base_models`` (UNet layouts);
- merging: ``merge`` (the entry points), ``result`` (strengths, the merged LoRA and its report), ``pipeline``
  (plan, then compute), ``methods/`` (the registry and one module per merge method, every kind: static,
  sampling-time, data-driven), ``lowrank`` (the arithmetic every rule ends in), ``runtime`` (what a method adds in
  the layers' forwards while the model runs), ``calibration`` (the model run a data-driven method gets from the
  host), ``ziplora`` (the factored per-pair optimisation), ``any_family`` (the CLI's name-matched merge);
- the hypernetwork: ``model`` (H and its files), ``checkpoints`` (the published ones: find, download, verify);
- ``training/``: training H: the dataset and its checks, the loop, the recipe, resumable checkpoints, several
  processes, the output file, ``python -m hypernet train | check-dataset``;
- ``evaluation/``: the paper's MLLM-judge protocol, the judge client and its transport, pictures, ranking and the
  resumable run over folders; ``comparison``: the methods side by side in one labelled grid;
- pictures: ``coefficients``, ``loss_curve``, ``plotting``; shared: ``errors``, ``cache``;
- ``cli`` / ``__main__``: ``python -m hypernet merge | evaluate | train | check-dataset``.

Imports run one way, in three layers (tests/unit/test_layout.py holds every chain to 8 modules with the pack's
node side above): leaves that import nothing of the pack or only leaves (``layers``, ``names``, ``errors``,
``cache``, ``runtime``, ``calibration``, ``base_models``, ``plotting``; ``keys``, ``files``, ``tensors``,
``lowrank``, ``coefficients``), a middle (``lora_io``, ``model_keys``, ``model``, ``result``, ``pipeline``, the
method registry), and the entry modules above them (``merge``, ``ziplora``, ``checkpoints``, ``comparison``, the
method modules; the evaluation and training packages build on them). A constant or a small type comes from a
leaf.

The host's side (ComfyUI's models, sampling, folders) is nodes/adapter/, the only code that imports ComfyUI.
"""

__version__ = "0.2.0"
