"""What the nodes declare and share: category, custom types, the inputs several nodes take (strengths, the
methods' own parameters) and how a node's method parameters are read back."""

from __future__ import annotations

import comfy.samplers
import folder_paths

from ...hypernet import methods
from ...hypernet.files import file_sha256
from ...hypernet.result import STRENGTH_LIMIT

CATEGORY = "LoRA.rar"
HYPERNET_TYPE = "LORARAR_HYPERNET"
MERGED_TYPE = "LORARAR_MERGED_LORA"


def strength_input(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01, "tooltip": tooltip})


def sampler_input(tooltip: str) -> tuple:
    return (comfy.samplers.KSampler.SAMPLERS, {"default": "dpmpp_2m", "tooltip": tooltip})


def scheduler_input(tooltip: str) -> tuple:
    return (comfy.samplers.KSampler.SCHEDULERS, {"default": "karras", "tooltip": tooltip})


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def param_input(param: methods.Param, tooltip: str | None = None, **options) -> tuple:
    """A method parameter as a FLOAT input: its default, range and step, its help as tooltip (or ``tooltip``)."""
    return ("FLOAT", {"default": param.default, "min": param.minimum, "max": param.maximum, "step": param.step,
                      "tooltip": tooltip or param.help, **options})


def merge_nodes_run(method: methods.MergeMethod) -> bool:
    """Whether the merge and compare nodes can run ``method``: every method but those needing each side's reference
    images and prompts (ZipLoRA), which only a node taking them runs; the merge refuses them in one line elsewhere."""
    return not method.needs_references


def method_param_inputs() -> dict:
    """The parameters of every method the merge and compare nodes run, as optional inputs, e.g. ``np_lora_mu``, in
    the order the methods declare (hypernet.methods.all_methods: by ``since``, then ``position``): saved workflows
    hold widget values by position, so a new method's widgets come after every existing one."""
    return {methods.param_key(method, param): param_input(param, f"{method.name} only: {param.help}")
            for method in methods.all_methods() if merge_nodes_run(method) for param in method.params}


# the compare node's calibration without each LoRA's own conditioning (nodes/adapter/merging.py does it)
GRID_PROMPT_FALLBACK = "; unconnected: the grid's positive prompt for both LoRAs"


def calibration_inputs(fallback: str = "") -> dict:
    """Each LoRA's own conditioning, for the methods that calibrate on it (SSR-Merge); links, not widgets, at the end
    so saved workflows' widget values keep their places. ``fallback``: what the node does when one is unconnected."""
    names = ", ".join(method.name for method in methods.all_methods() if method.needs_model and merge_nodes_run(method))
    return {f"{side}_conditioning": ("CONDITIONING", {"tooltip": f"{names} only: the {side} LoRA's own prompt, encoded "
                                                                 f"(e.g. '{example}'); its calibration runs one sampling "
                                                                 f"step per LoRA on it{fallback}"})
            for side, example in (("subject", "a photo of sks dog"), ("style", "a watercolor painting"))}


def params_for(method: str, given: dict) -> dict[str, float]:
    """The node inputs of ``method``'s own parameters, by parameter name (the others' are ignored)."""
    rule = methods.get(method)
    return {param.name: given[methods.param_key(rule, param)] for param in rule.params
            if methods.param_key(rule, param) in given}


def loras_changed(subject_lora=None, style_lora=None) -> str | float:
    """IS_CHANGED of a node reading two LoRA files: their content, not only their names."""
    if subject_lora is None or style_lora is None:
        return float("nan")  # names wired from another node: not known here, so always run (cheap when cached)
    hashes = []
    for name in (subject_lora, style_lora):
        path = folder_paths.get_full_path("loras", name)
        hashes.append(file_sha256(path) if path else str(name))
    return "|".join(hashes)
