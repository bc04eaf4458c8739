"""The one runtime-branch injector: a MODEL clone whose layers add a :class:`hypernet.runtime.RuntimeBranch`'s
h(x) to their output. K-LoRA (per sampling step), ZipLoRA (per optimisation side) and training (per pair) all
ride on it.

Mechanisms (both exist unchanged on ComfyUI 0.3.75 and 0.33.0, checked in their comfy/ sources):
- ``ModelPatcher.add_object_patch("diffusion_model.<module>.forward", fn)``: ModelPatcher.patch_model sets it on
  load and unpatch_model restores the original, so the weights are never copied or changed (bit-identical after
  unload). fn calls the layer's current forward (an earlier object patch when one exists, so patches chain; else
  the module's own forward, which applies stock LoRA weight patches and casts weights in lowvram / partial
  loading) and adds h(x), converted to the output's dtype;
- ``ModelPatcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, ...)``, only for a branch that follows the sampler:
  a wrapper around BaseModel.apply_model that sees the current sigma and ``transformer_options["sample_sigmas"]``
  (set by comfy/samplers.py for every sampler) and gives the branch its progress before the model runs.

Why not ComfyUI's own bypass injection (0.33.0's comfy/weight_adapter/bypass.py, which adds an adapter's h(x) to a
layer's output): 0.3.75 has no such module, and its adapters are fixed per layer, while a branch here is routed per
call (which side, which pair). Weight wrappers (``add_weight_wrapper``) would form the dense d_out x d_in update on
every forward, which the pack never does. Each injection makes its own branch state (``RuntimePart.branch()``),
so two patched clones of one merge never share a choice.
"""

from __future__ import annotations

import comfy.patcher_extension
import torch

from ...hypernet.runtime import RuntimeBranch, schedule_progress

WRAPPER_KEY = "lorarar_runtime_branch"


def sampling_progress(sigma: torch.Tensor, transformer_options: dict, model_sampling) -> float:
    """p in [0, 1] of the model call at ``sigma``: its place in the sampler's schedule (sample_sigmas), or,
    without a schedule (a model called outside comfy's samplers), its timestep between sigma_max and sigma_min."""
    level = float(sigma.max()) if isinstance(sigma, torch.Tensor) else float(sigma)  # one sigma per batch row
    schedule = transformer_options.get("sample_sigmas")
    if schedule is not None and len(schedule) >= 2:
        return schedule_progress(level, schedule.tolist() if isinstance(schedule, torch.Tensor) else list(schedule))
    first = float(model_sampling.timestep(torch.as_tensor(model_sampling.sigma_max)))
    last = float(model_sampling.timestep(torch.as_tensor(model_sampling.sigma_min)))
    now = float(model_sampling.timestep(torch.as_tensor(level)))
    return min(1.0, max(0.0, (first - now) / (first - last))) if first != last else 0.0


def _progress_wrapper(branch: RuntimeBranch):
    def apply_model(executor, x, t, *args, **kwargs):
        options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        branch.at_progress(sampling_progress(t, options, executor.class_obj.model_sampling))
        return executor(x, t, *args, **kwargs)
    return apply_model


class BranchForward:
    """forward(x) of one layer: its current forward plus the branch's h(x) for this layer (None: nothing added).

    Every branch's ``extra`` gets x channels last, (..., d_in), and returns (..., d_out), whatever the layer: a 1x1
    conv's (B, d_in, H, W) input is moved here and its h(x) moved back, so no branch handles conv layouts itself."""

    def __init__(self, module: torch.nn.Module, name: str, branch: RuntimeBranch, inner=None):
        self.module, self.name, self.branch = module, name, branch
        self.inner = inner  # an earlier object patch of this forward (another merge upstream), kept in the chain
        self.channels_first = _is_pointwise_conv(module)

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs) if self.inner is not None else type(self.module).forward(self.module, x, *args, **kwargs)
        extra = self.branch.extra(self.name, x.movedim(1, -1) if self.channels_first else x)
        if extra is None:
            return out
        return out + (extra.movedim(-1, 1) if self.channels_first else extra).to(out.dtype)


def _is_linear(module) -> bool:
    """A torch.nn.Linear, or the linear ComfyUI 0.33+ builds for a quantised model (an fp8 or scaled fp8 file:
    comfy.ops mixed_precision_ops, a torch.nn.Module with in/out_features, weight, bias and a linear forward,
    not a torch.nn.Linear subclass); its own forward dequantises, so the branch works on it unchanged."""
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Module) and all(
        hasattr(module, name) for name in ("in_features", "out_features", "weight", "bias")))


def _is_pointwise_conv(module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _not_injectable(module, path: str | None) -> str | None:
    """Why the branch cannot add h(x) = B A x to this module's output (None: a linear or a 1x1 conv, it can)."""
    if path is None or module is None:
        return "not in this model"
    if _is_linear(module) or _is_pointwise_conv(module):
        return None
    if isinstance(module, torch.nn.Conv2d):
        kernel = "x".join(str(k) for k in module.kernel_size)
        return f"{path} is a {kernel} convolution: a runtime branch adds to linears and 1x1 convs only"
    return f"{path} is not a linear layer"


def inject(model, branch: RuntimeBranch, paths: dict[str, str]) -> tuple[object, list[str], dict[str, str]]:
    """A clone of ``model`` whose layers run ``branch``; ``paths``: layer name -> module path under model.model.

    Returns (clone, layers injected, {layer: why not} for those that are not in this model, are no linear or
    1x1 conv (a kxk conv is named as one), or whose addition does not fit the layer's weight). A merge's runtime
    part claiming a kxk conv is refused before this (fit.py); a training route over every layer skips them here.
    """
    patched = model.clone()
    applied, skipped = [], {}
    for name in branch.layer_names():
        path = paths.get(name)
        module = patched.get_model_object(path) if path is not None else None
        why = _not_injectable(module, path)
        if why:
            skipped[name] = why
            continue
        bias = None if module.bias is None else tuple(module.bias.shape)
        why = branch.misfit(name, tuple(module.weight.shape), bias)
        if why:
            skipped[name] = why
            continue
        key = f"{path}.forward"
        patched.add_object_patch(key, BranchForward(module, name, branch, patched.object_patches.get(key)))
        applied.append(name)
    if applied and branch.follows_sampling:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _progress_wrapper(branch))
    return patched, applied, skipped
