"""K-LoRA at sampling time: a MODEL clone whose switched attention linears add the subject's or the style's
low-rank update, chosen from the sampler's progress at every model call.

Mechanisms (both exist unchanged on ComfyUI 0.3.75 and 0.33.0, checked in their comfy/ sources):
- ``ModelPatcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, ...)``: a wrapper around BaseModel.apply_model
  that sees the current sigma ``t`` and ``transformer_options["sample_sigmas"]`` (set by comfy/samplers.py for
  every sampler) and sets this clone's progress before the UNet runs;
- ``ModelPatcher.add_object_patch("diffusion_model.<module>.forward", fn)``: ModelPatcher.patch_model sets it
  on load and unpatch_model restores the original, so the weights are never copied or changed per step.
  fn calls the module's own forward (which applies stock LoRA weight patches, and casts weights in lowvram /
  partial loading) and adds up(down(x)) of the chosen side, factors moved to x's device and dtype once.
Wrapper and forwards share one state object per patched clone: two K-LoRA models in one graph never mix.
"""

from __future__ import annotations

import comfy.patcher_extension
import torch
import torch.nn.functional as F

from ..hypernet.methods.k_lora import KLoraSwitch, schedule_progress

WRAPPER_KEY = "lorarar_k_lora"


class _Progress:
    """The switch's current choice for one patched model; updated by the wrapper at every model call."""

    def __init__(self, switch: KLoraSwitch):
        self.switch = switch
        self.p = 0.0
        self.choice = switch.choose(0.0)  # a forward outside sampling (no wrapper call yet) gets the first step's

    def set(self, p: float) -> None:
        if p != self.p:
            self.p, self.choice = p, self.switch.choose(p)


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


def _progress_wrapper(state: _Progress):
    def apply_model(executor, x, t, *args, **kwargs):
        options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        state.set(sampling_progress(t, options, executor.class_obj.model_sampling))
        return executor(x, t, *args, **kwargs)
    return apply_model


class _SwitchedForward:
    """forward(x) of one attention linear: its own forward plus the chosen side's up(down(x)) (+ bias difference)."""

    def __init__(self, module: torch.nn.Module, name: str, state: _Progress, inner=None):
        self.module, self.name, self.state = module, name, state
        self.inner = inner  # an earlier object patch of this forward (e.g. a K-LoRA merge upstream), kept in the chain
        self._factors: dict[tuple, dict[str, tuple]] = {}

    def factors(self, side: str, device, dtype) -> tuple:
        key = (device, dtype)
        if key not in self._factors:
            switched = self.state.switch.layers[self.name]
            self._factors[key] = {label: (layer.down.flatten(1).to(device, dtype), layer.up.flatten(1).to(device, dtype),
                                          None if layer.bias is None else layer.bias.to(device, dtype))
                                  for label, layer in (("subject", switched.subject), ("style", switched.style))}
        return self._factors[key][side]

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs) if self.inner is not None else type(self.module).forward(self.module, x, *args, **kwargs)
        down, up, bias = self.factors(self.state.choice[self.name], x.device, x.dtype)
        return out + F.linear(F.linear(x, down), up, bias)


def _module_path(target) -> str | None:
    """``diffusion_model.<module>`` of a key-map entry that patches a whole ``.weight``, else None."""
    return target[:-len(".weight")] if isinstance(target, str) and target.endswith(".weight") else None


def _is_linear(module) -> bool:
    """A torch.nn.Linear, or the linear ComfyUI 0.33+ builds for a quantised model (an fp8 or scaled fp8 file:
    comfy.ops mixed_precision_ops, a torch.nn.Module with in/out_features, weight, bias and a linear forward,
    not a torch.nn.Linear subclass); its own forward dequantises, so the switched forward works on it unchanged."""
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Module) and all(
        hasattr(module, name) for name in ("in_features", "out_features", "weight", "bias")))


def patch_switched(model, switch: KLoraSwitch, key_map: dict) -> tuple[object, int, str]:
    """A clone of ``model`` sampling with K-LoRA; returns (clone, layers switched, a line for the report)."""
    patched = model.clone()
    state = _Progress(switch)
    applied, skipped = [], {}
    for name, layer in switch.layers.items():
        path = _module_path(key_map.get(name))
        module = patched.get_model_object(path) if path is not None else None
        if not _is_linear(module):
            skipped[name] = "not in this model" if path is None else f"{path} is not a linear layer"
            continue
        bias = None if module.bias is None else tuple(module.bias.shape)
        why = layer.subject.misfit(tuple(module.weight.shape), bias)
        if why:
            skipped[name] = why
            continue
        key = f"{path}.forward"
        patched.add_object_patch(key, _SwitchedForward(module, name, state, patched.object_patches.get(key)))
        applied.append(name)
    if applied:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _progress_wrapper(state))
    text = f"switched per sampling step: {len(applied)} layers"
    if skipped:
        name, why = next(iter(skipped.items()))
        text += f"; not switched: {len(skipped)} layers that do not fit this model, e.g. {name}: {why}"
    return patched, len(applied), text
