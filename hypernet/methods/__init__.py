"""The merge methods, by name: ``get("lorarar")``; ``names()`` is what the node and the CLI offer.

A new method is one module here with one :class:`~hypernet.methods.base.MergeMethod` subclass, passed to
:func:`register` at import and imported below.
"""

from __future__ import annotations

from ..errors import LoraRarError
from .base import SIDES, Claim, LayerJob, MergeContext, MergedLayer, MergeMethod, Param, kept

_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"merge method name {method.name!r} is empty or taken")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        raise LoraRarError(f"unknown merge method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_methods() -> tuple[MergeMethod, ...]:
    return tuple(_REGISTRY.values())


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


# imported for their register() calls; the order is the order the node and CLI list them, and the order of the
# methods' parameter inputs on the nodes: saved workflows keep widget values by position, so a new method's
# parameters go last (after np_lora_mu, which 0.2.0 workflows already hold)
from . import lorarar, direct, np_lora, b_lora, k_lora  # noqa: E402,F401

__all__ = ["Claim", "LayerJob", "MergeContext", "MergedLayer", "MergeMethod", "Param", "SIDES", "all_methods", "get",
           "kept", "names", "param_key", "register", "resolve_params", "unregister"]
