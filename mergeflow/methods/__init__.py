"""The method registry: every merging method, its hyper-parameters and its reference.

A method is a function over one tensor at a time (the engine streams the checkpoints)::

    fn(name, base, taus, **hp) -> Tensor            # static: the merged task vector
    fn(name, base, taus, **hp) -> list[Tensor]      # dynamic: one task vector per task

``base`` is theta_0 and ``taus`` the task vectors tau_t of that tensor, in float32 on the
working device; the engine adds the result to theta_0 and writes the base's dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from mergeflow.errors import MergeflowError


@dataclasses.dataclass(frozen=True)
class Param:
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any, where: str) -> Any:
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.default is not None and not isinstance(value, kind) or isinstance(value, bool) != isinstance(self.default, bool):
            raise MergeflowError(f"{where}: expected {kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MergeflowError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise MergeflowError(f"{where}: {value!r} is outside [{self.low}, {self.high}]")
        return value


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor | list[torch.Tensor]]
    dynamic: bool
    params: dict[str, Param]
    reference: str
    summary: str

    def hyper(self, given: dict[str, Any] | None = None, where: str = "") -> dict[str, Any]:
        """Defaults overlaid with ``given``, each checked; unknown names are an error naming the key."""
        given = dict(given or {})
        out = {}
        for key, spec in self.params.items():
            out[key] = spec.check(given.pop(key), f"{where}{key}") if key in given else spec.default
        if given:
            key = sorted(given)[0]
            known = ", ".join(self.params) or "none"
            raise MergeflowError(f"{where}{key}: unknown hyper-parameter of {self.name} (known: {known})")
        return out

    def __call__(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], **hp: Any):
        return self.fn(name, base, taus, **hp)


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, dynamic: bool = False, params: dict[str, Param] | None = None, reference: str = "", summary: str = ""):
    """Decorator adding a per-tensor merge function to the registry under ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name} registered twice")
        _REGISTRY[name] = Method(name, fn, dynamic, dict(params or {}), reference, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeflowError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the modules registers their methods.
from mergeflow.methods import task_arithmetic, tswitch, weight_average  # noqa: E402,F401
