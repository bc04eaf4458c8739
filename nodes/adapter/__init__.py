"""The pack's one adapter to ComfyUI: the only code that knows ComfyUI's internals. Its names below are the only
door; node classes (nodes/*.py) and the training command use nothing else of ComfyUI's side.

- model.py: a loaded MODEL / CLIP as the pack reads it: family, UNet layout, ComfyUI's own LoRA key map, weights
  and shapes, LoRA files read through that key map (``ModelView``: one reader for every entry point);
- roles.py: which linear is an attention query, key, value or output, from ComfyUI's attention classes;
- fit.py: the one fit / shape / overflow verdict on a model's view, and a merge's runtime part injected;
- branch.py: the one runtime-branch injector (object patches; the sampler's progress for routers that follow it);
- sampling.py: conditioning as apply_model arguments, noising, prediction and training target per prediction
  type, loading and unloading only the model in use, the stock nodes' encode / sample / decode;
- hypernets.py: hypernet files in ComfyUI's folders, loaded once, the one for a model;
- inputs.py: the category, custom types and inputs several nodes declare;
- calibration.py: the model a data-driven method runs through while merging (hypernet/calibration.py's host side);
- fingerprints.py: the content keys of a cached result that ran the model (tensor hashes, what is on the model);
- merging.py (the merge and compare nodes), ziplora.py, judging.py, outputs.py: what each node runs, one function
  each (a Compare column is the merge node's own merge, so the two share a module).
"""

from .branch import inject, sampling_progress
from .fit import layer_misfit
from .hypernets import (LoadedHypernets, hypernet_changed, hypernet_choices, license_line, load_hypernets,
                        register_folder)
from .inputs import (CATEGORY, GRID_PROMPT_FALLBACK, HYPERNET_TYPE, MERGED_TYPE, calibration_inputs, lora_names, loras_changed,
                     method_param_inputs, param_input, params_for, sampler_input, scheduler_input, strength_input)
from .judging import JudgeSettings, evaluate_images
from .merging import MergeRequest, Sampling, compare, merge_for_model
from .model import ModelView, apply_merged, diffusion_layers, lora_path, model_class, model_layout, refuse_unsupported
from .outputs import IF_EXISTS, SAVE_DTYPES, coefficient_outputs, save_merged, target_path
from .roles import attention_classes, attention_roles, unknown_attention_classes
from .sampling import (NoisedBatch, encode_images, encode_text, loaded, model_conditioning, noised_batch, prediction,
                       target, timestep_count, trainable)
from .ziplora import Settings, optimise_for_model


def forget_results() -> None:
    """Empty every cache the adapter keeps between runs (benchmarks time cold runs; nothing else needs it)."""
    from ...hypernet.files import forget_hashes
    from . import calibration, merging, model, sampling, ziplora

    for cache in (merging.MERGES, model.VERDICTS, ziplora.RESULTS, sampling.ENCODINGS, calibration.CALIBRATIONS):
        cache.clear()
    forget_hashes()

__all__ = [
    "CATEGORY", "GRID_PROMPT_FALLBACK", "HYPERNET_TYPE", "IF_EXISTS", "JudgeSettings",
    "LoadedHypernets", "MERGED_TYPE", "MergeRequest", "ModelView", "NoisedBatch", "SAVE_DTYPES", "Sampling",
    "Settings", "apply_merged", "attention_classes", "attention_roles", "calibration_inputs", "coefficient_outputs",
    "compare",
    "diffusion_layers", "encode_images", "forget_results", "encode_text", "evaluate_images", "hypernet_changed", "hypernet_choices",
    "inject", "layer_misfit", "license_line", "load_hypernets", "loaded", "lora_names", "lora_path", "loras_changed",
    "merge_for_model", "method_param_inputs", "model_class", "model_conditioning", "model_layout", "noised_batch",
    "optimise_for_model", "param_input", "params_for", "prediction", "refuse_unsupported", "register_folder",
    "sampling_progress", "sampler_input", "save_merged", "scheduler_input", "strength_input", "target", "target_path",
    "timestep_count", "trainable",
    "unknown_attention_classes",
]
