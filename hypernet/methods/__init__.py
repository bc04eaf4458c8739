"""The merge methods, by name: ``get("lorarar")``; ``names()`` is what the node and the CLI offer.

This package holds the registry (here), what a method is built from (``base``: ``MergeMethod``, ``Claim``,
``LayerJob``, ``MergeContext``, ``Param``), and one module per method, of every kind: ``lorarar`` (the LoRA.rar
hypernetwork), ``direct`` (the sum), ``np_lora`` (NP-LoRA), ``b_lora`` (B-LoRA's block split), ``k_lora``
(``k-lora`` and ``k-lora-linear``: chosen per sampling step), ``zip_lora`` (ZipLoRA: optimised through the model),
``est_lora`` (EST-LoRA: K-LoRA's choice by update energy), ``ssr_merge`` (SSR-Merge: a router per layer from one
calibration step per LoRA).

A new method is one module here with one :class:`~hypernet.methods.base.MergeMethod` subclass, passed to
:func:`register` at import; every module of this package is imported below, so adding one touches no other file.
Methods are listed in the order they declare (``since``, ``position``), never by name or import order: the
node's parameter widgets follow it, and saved workflows hold widget values by position.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import LoraRarError
from .base import SIDES, Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param, kept

_REGISTRY: dict[str, MergeMethod] = {}


def _listed(method: MergeMethod) -> tuple[tuple[int, ...], int]:
    """Where ``method`` is listed: by the pack version that added it, then its position among that version's."""
    return tuple(int(part) for part in method.since.split(".")), method.position


def register(method: MergeMethod) -> MergeMethod:
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"merge method name {method.name!r} is empty or taken")
    try:
        listed = _listed(method)
    except ValueError:
        listed = None
    if listed is None or method.position < 1:
        raise ValueError(f"merge method {method.name}: since {method.since!r} and position {method.position!r} must "
                         "name the pack version that added it (e.g. '0.3.0') and its place among that version's (1, 2, ...)")
    taken = next((other for other in _REGISTRY.values() if _listed(other) == listed), None)
    if taken is not None:
        raise ValueError(f"merge method {method.name}: since {method.since} position {method.position} is taken by "
                         f"{taken.name}; give it the next free position")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        raise LoraRarError(f"unknown merge method {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def all_methods() -> tuple[MergeMethod, ...]:
    """Every registered method, oldest first (by ``since``, then ``position``): the order of the node's method
    list and of its parameter widgets, whatever the methods' names and whichever module was imported first."""
    return tuple(sorted(_REGISTRY.values(), key=_listed))


def names() -> tuple[str, ...]:
    return tuple(method.name for method in all_methods())


def param_key(method: MergeMethod, param: Param) -> str:
    """The node input / report name of a method parameter: ``np-lora`` + ``mu`` -> ``np_lora_mu``."""
    return f"{method.name.replace('-', '_')}_{param.name}"


def resolve_params(method: MergeMethod, given: dict[str, float] | None) -> dict[str, float]:
    """The method's parameters: defaults, overridden by ``given`` (keyed by param name), range-checked."""
    given = dict(given or {})
    values = {}
    for param in method.params:
        value = float(given.pop(param.name, param.default))
        if not (param.minimum <= value <= param.maximum):  # also refuses NaN
            raise LoraRarError(f"{method.name} {param.name} {value!r}: must be between {param.minimum:g} and {param.maximum:g}")
        values[param.name] = value
    if given:
        raise LoraRarError(f"method {method.name} has no parameter {', '.join(sorted(given))}")
    return values


# every method module, imported for its register() call; the order they are imported in decides nothing
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Claim", "LayerJob", "MergeContext", "MergedLayer", "MergeMethod", "Param", "SIDES", "all_methods", "get",
           "kept", "names", "param_key", "register", "resolve_params", "unregister"]
