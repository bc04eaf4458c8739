"""What the merge node and the compare node run.

The merge: two LoRA files read through the model's key map, merged by a registered method (hypernet/merge.py),
cached by content, and applied to MODEL / CLIP with its report (``merge_for_model``).

Compare: one subject LoRA, one style LoRA, one seed, one prompt through every merge method -> a labelled grid
(``compare``). Each column is merged by the merge node's own function above (so what is compared is what the
merge node gives), its prompt encoded with that column's CLIP (a merge's text-encoder layers change the
conditioning), or the connected conditioning used as it is (models whose text encoders are not loaded as a CLIP),
sampled with ComfyUI's own sampler and decoded with the VAE. The columns and the grid come from
hypernet/comparison.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import comfy.utils
import torch

from ...hypernet import comparison, methods
from ...hypernet.cache import BoundedCache
from ...hypernet.checkpoints import load_manifest
from ...hypernet.comparison import Column
from ...hypernet.errors import LoraRarError, unforeseen_as_error
from ...hypernet.files import file_sha256
from ...hypernet.merge import merge_loras
from ...hypernet.layers import SIDES
from ...hypernet.result import MergedLora, Strengths
from .calibration import PromptCalibration
from .inputs import merge_nodes_run, params_for
from .model import ModelView, apply_merged, lora_path, model_class, model_layout, model_signature
from .roles import attention_roles, unknown_attention_classes
from .sampling import encode_prompts, sample_and_decode, throw_if_cancelled, to_image, to_pil

# The last merge, keyed by the inputs' content: re-running a graph where only the prompt or the sampler changed
# reuses it. One entry, so ComfyUI's own cache settings still bound what stays in memory.
MERGES: BoundedCache[MergedLora] = BoundedCache(
    1, "files' sha256, hypernet sha256, method and parameters, layer policy, strengths, model signature, roles")


@dataclass(frozen=True)
class MergeRequest:
    """What the merge node (or a Compare column) asks for; LoRAs by their names in models/loras."""

    subject_lora: str
    style_lora: str
    method: str
    layer_policy: str
    strengths: Strengths
    params: dict


def _base_model_note(name: str | None, model) -> str:
    """A line for the report when the hypernet was trained on another member of the SDXL family."""
    info = load_manifest().get(name) if name else None
    if info is None or model_class(model) in info.comfy_model_classes[:1]:
        return ""
    return (f"note: the {info.name} hypernet was trained on {info.comfy_model_classes[0]} LoRAs; this model is "
            f"{model_class(model)} (same attention widths)")


def _unknown_attention_note(method: str, model) -> str:
    """A line for the report when a method that treats attention apart meets attention classes the pack's table
    lacks: their linears get no role, so they follow the layer policy (a new ComfyUI family, a custom model)."""
    unknown = unknown_attention_classes(model.model.diffusion_model) if methods.get(method).needs_roles else []
    return (f"note: {len(unknown)} attention classes of this model are not in the pack's table ({', '.join(unknown[:3])}): "
            "their linears follow the layer policy" if unknown else "")


def _merge_files(request: MergeRequest, paths: tuple[str, str], net, model, clip, roles: dict,
                 calibration: PromptCalibration | None) -> MergedLora:
    view = ModelView(model, clip)
    subject, style = view.read_pair(*paths)
    bar = comfy.utils.ProgressBar(1)
    with unforeseen_as_error(" + ".join(paths)):
        # checked against the model itself: a LoRA for another base model is refused whatever the method
        return merge_loras(subject, style, net, request.method, request.layer_policy, request.strengths,
                           layout=view.layout, device=comfy.model_management.get_torch_device(), params=request.params,
                           progress=lambda done, total: bar.update_absolute(done, total), family=view.family,
                           roles=roles, calibration=calibration)


def _calibration(request: MergeRequest, paths: tuple[str, str], model, clip,
                 conditioning: dict | None) -> PromptCalibration | None:
    """The calibration a method that runs the model on each LoRA's own conditioning needs (SSR-Merge), or None."""
    rule = methods.get(request.method)
    if not rule.needs_model or rule.needs_references:
        return None
    missing = [f"{side}_conditioning" for side in SIDES if (conditioning or {}).get(side) is None]
    if missing:
        raise LoraRarError(f"{rule.name}: connect {' and '.join(missing)} (a CLIP Text Encode of each LoRA's own "
                           "prompt, e.g. 'a photo of sks dog' and 'a watercolor painting'): its calibration runs one "
                           "sampling step per LoRA on them")
    for side in SIDES:  # a CONDITIONING is a non-empty list of [tensor (batch, tokens, width), dict]
        given = conditioning[side]
        if not (isinstance(given, list) and given and all(
                isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
                and entry[0].dim() == 3 and isinstance(entry[1], dict) for entry in given)):
            raise LoraRarError(f"{rule.name}: {side}_conditioning is empty or not a CONDITIONING (a list of [tensor "
                               "(batch, tokens, width), dict]): connect a CLIP Text Encode of the LoRA's own prompt")
    return PromptCalibration(model, conditioning, ModelView(model, clip).module_paths(), paths,
                             tuple(map(file_sha256, paths)))


def _calibration_line(calibration: PromptCalibration | None) -> str:
    if calibration is None:
        return ""
    if calibration.seconds is None:
        return f"calibration: reused ({calibration.describe}; same files, conditioning and model)"
    return f"calibration: {calibration.describe}: {calibration.seconds:.1f} s"


def merge_for_model(model, clip, hypernet, request: MergeRequest, conditioning: dict | None = None) -> tuple:
    """(MODEL, CLIP, merged LoRA as applied, report text) of ``request`` on this model; ``conditioning``: side ->
    CONDITIONING, each LoRA's own prompt, for a method that calibrates on them (SSR-Merge)."""
    paths = (lora_path(request.subject_lora), lora_path(request.style_lora))
    net, name = None, None
    if methods.get(request.method).needs_hypernet:
        net, _, name = hypernet.for_model(model)
    # the roles decide what k-lora / lorarar do per layer, and two models of one class and unet_config can
    # differ in them (a node pack's own attention modules): they are part of the key (a few ms on a 12B model)
    with unforeseen_as_error(f"{model_class(model)} model's attention modules"):
        roles = attention_roles(getattr(model.model, "diffusion_model", None))
    key = (*map(file_sha256, paths), net.sha256 if net else None, request.method,
           tuple(sorted(request.params.items())), request.layer_policy, request.strengths,
           model_signature(model, clip), tuple(sorted(roles.items())))
    calibration = _calibration(request, paths, model, clip, conditioning)
    key += (calibration.key,) if calibration is not None else ()
    merged, _ = MERGES.get_or_make(key, lambda: _merge_files(request, paths, net, model, clip, roles, calibration),
                                   (model.model,) if calibration is not None else ())  # the model it ran
    # the names (and paths) given now, also when the merge itself was reused for files of the same content
    merged = merged.named(request.subject_lora, request.style_lora, *paths)
    model_out, clip_out, applied, applied_text = apply_merged(model, clip, merged)
    notes = [_calibration_line(calibration), _base_model_note(name, model), _unknown_attention_note(request.method, model)]
    trained = f"hypernet {net.describe(name)}" if net is not None and net.training_metadata else ""
    return (model_out, clip_out, applied,
            "\n".join(filter(None, [applied.report.to_text(), applied_text, *notes, trained])))


# ---- Compare: every method's merge of one pair, sampled with one seed -----------------------------------------

GIVEN_CONDITIONING_NOTE = ("conditioning: the connected positive/negative conditioning, the same for every column "
                           "(a merge's text-encoder layers cannot change it)")
ENCODED_NOTE = "conditioning: the prompts, encoded per column with that column's CLIP"


@dataclass(frozen=True)
class Sampling:
    """The stock KSampler's settings, the same for every column."""

    latent_image: dict
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float


def _column_model(column: str, model, clip, hypernet, subject_lora, style_lora, layer_policy, given,
                  calibration_conditioning) -> tuple:
    """(model, clip, merge report) of one column; LoraRarError when this column cannot run on these inputs."""
    if column == comparison.NO_LORA:
        return model, clip, ""
    method, strengths = column, Strengths()
    if column in (comparison.SUBJECT_ONLY, comparison.STYLE_ONLY):
        # one LoRA alone: the other at strength 0, read and patched exactly as the methods' merges are
        method = comparison.ALONE_METHOD
        strengths = Strengths(1.0, 0.0, 1.0, 0.0) if column == comparison.SUBJECT_ONLY else Strengths(0.0, 1.0, 0.0, 1.0)
    elif methods.get(column).needs_hypernet and hypernet is None:
        if model_layout(model) is None:  # a DiT: no published hypernet, so the loader would not help either
            raise LoraRarError(f"{column} needs a hypernet trained for {model_class(model)} models (none is published; "
                               "README: 'Other model families')")
        raise LoraRarError(f"{column} needs a hypernet: connect the LoRA.rar Hypernet Loader")
    request = MergeRequest(subject_lora, style_lora, method, layer_policy, strengths, params_for(method, given))
    rule = methods.get(method)
    conditioning, note = calibration_conditioning() if rule.needs_model and not rule.needs_references else (None, "")
    patched_model, patched_clip, _, report = merge_for_model(model, clip, hypernet, request, conditioning)
    return patched_model, patched_clip, "\n".join(filter(None, [report, note]))


def conditioning_source(clip, positive_conditioning, negative_conditioning) -> str:
    """The report's line on where the conditioning comes from; a one-line LoraRarError when the inputs cannot say."""
    if (positive_conditioning is None) != (negative_conditioning is None):
        given, missing = (("positive", "negative") if negative_conditioning is None else ("negative", "positive"))
        raise LoraRarError(f"compare: {given}_conditioning is connected but {missing}_conditioning is not: connect "
                           "both (used instead of the prompts) or neither (the prompts are encoded with the CLIP)")
    if positive_conditioning is not None:
        return GIVEN_CONDITIONING_NOTE
    if clip is None:
        raise LoraRarError("compare: connect a CLIP to encode the prompts, or connect positive_conditioning and "
                           "negative_conditioning (models whose text encoders are not loaded as a CLIP)")
    return ENCODED_NOTE


def _params_of(column: str, given: dict) -> dict[str, float]:
    """The parameters a method column runs with (its defaults unless set on the node); none for a baseline, or for
    a method this node cannot run (its column says why)."""
    if column in comparison.BASELINES or not merge_nodes_run(methods.get(column)):
        return {}
    return methods.resolve_params(methods.get(column), params_for(column, given))


def _calibration_conditioning(clip, prompts, given_conditioning, own: dict) -> Callable[[], tuple[dict, str]]:
    """Each side's conditioning for a column that calibrates on it (SSR-Merge), made when such a column runs: the
    connected subject/style conditioning, else the grid's positive prompt as the base CLIP encodes it (or the
    connected positive conditioning), which names both the subject and the style in a grid's usual prompt."""
    def make() -> tuple[dict, str]:
        grid = given_conditioning[0] if given_conditioning else encode_prompts(clip, *prompts)[0]
        missing = [side for side in SIDES if own.get(side) is None]
        note = (f"calibration conditioning of the {' and '.join(missing)} LoRA: the grid's positive prompt (connect "
                f"{' and '.join(f'{side}_conditioning' for side in missing)} for each LoRA's own)") if missing else ""
        return {side: own[side] if own.get(side) is not None else grid for side in SIDES}, note
    return make


def compare(model, vae, clip, hypernet, subject_lora: str, style_lora: str, prompts: tuple[str, str],
            given_conditioning: tuple | None, sampling: Sampling, selection: str, layer_policy: str,
            method_params: dict, own_conditioning: dict | None = None) -> tuple:
    """(grid IMAGE, images IMAGE, labels, report) of every selected column; ``given_conditioning``:
    (positive, negative) CONDITIONING used for every column instead of encoding ``prompts``; ``own_conditioning``:
    side -> each LoRA's own CONDITIONING, for a column that calibrates on it (else the grid's positive prompt)."""
    source = conditioning_source(clip, *(given_conditioning or (None, None)))
    calibration = _calibration_conditioning(clip, prompts, given_conditioning, own_conditioning or {})
    columns = [Column(name, _params_of(name, method_params)) for name in comparison.select_columns(selection)]
    bar = comfy.utils.ProgressBar(len(columns))
    reports, images = [], []
    for done, column in enumerate(columns):
        throw_if_cancelled()
        started = time.perf_counter()
        try:
            column_model, column_clip, report = _column_model(column.name, model, clip, hypernet, subject_lora,
                                                              style_lora, layer_policy, method_params, calibration)
        except LoraRarError as error:
            column.failure = str(error)
            reports.append(f"{column.label}: did not run: {error}")
        else:
            conditioning = given_conditioning or encode_prompts(column_clip, *prompts, clip)
            sampled = sample_and_decode(column_model, vae, conditioning, sampling.latent_image, sampling.seed,
                                        sampling.steps, sampling.cfg, sampling.sampler_name, sampling.scheduler,
                                        sampling.denoise)
            images.append(sampled)
            column.images = to_pil(sampled)
            reports.append(f"{column.label}: {len(column.images)} image(s) in {time.perf_counter() - started:.1f} s"
                           + ("\n  " + report.replace("\n", "\n  ") if report else ""))
        bar.update_absolute(done + 1, len(columns))
    if not images:
        raise LoraRarError("compare: no method could run on these inputs: "
                           + "; ".join(f"{c.label}: {c.failure}" for c in columns))
    grid = to_image(comparison.comparison_grid(columns, f"{subject_lora} + {style_lora}, seed {sampling.seed}"))
    header = (f"LoRA.rar compare: {subject_lora} + {style_lora}; seed {sampling.seed}, {sampling.steps} steps, cfg "
              f"{sampling.cfg:g}, {sampling.sampler_name}/{sampling.scheduler}, denoise {sampling.denoise:g}, "
              f"layer policy {layer_policy}; {source}")
    # the columns share the latent, so their size
    return (grid, torch.cat(images, dim=0), "\n".join(comparison.labels_for_images(columns)), "\n".join([header, *reports]))
