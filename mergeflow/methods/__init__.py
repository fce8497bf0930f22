"""The method registry: every merging method, its hyper-parameters and its reference.

A method is a function over one tensor at a time (the engine streams the checkpoints)::

    fn(name, base, taus, **hp) -> Tensor            # static: the merged task vector
    fn(name, base, taus, **hp) -> list[Tensor]      # dynamic: one task vector per task

``base`` is theta_0 and ``taus`` the task vectors tau_t of that tensor, in float32 on the
working device; the engine adds the result to theta_0 and writes the base's dtype. ``name``
is the tensor's name (methods seed per-tensor randomness with it, or skip tensors by it).

A method that needs statistics over the whole model first (a global magnitude threshold,
EMR's rescalers) also registers ``prepare(stream, hp) -> ctx``: ``stream()`` yields
``(name, base, taus)`` for every floating tensor and may be called more than once (each
call re-reads the inputs, one tensor at a time; ``stream.names``, where the engine sets it,
lists the names it yields without reading anything); ``fn`` then receives ``ctx=ctx``.
A method whose work is elementwise once a few per-tensor numbers are known (Task
Arithmetic; TIES given its trim thresholds) registers ``blockwise=True`` (or a predicate on
its hyper-parameters) and, if it needs them, ``tensor_stats(name, tau_of, n_tasks, hp,
ctx) -> stats``, where ``tau_of(t)`` is task t's whole float32 task vector of the tensor;
the engine then calls ``fn`` on flat slices of the tensor with ``stats=stats``, so big
tensors never sit in memory in float32 for every task at once. ``tau_of.kth_abs(t, k)``
gives the exact k-th largest |tau_t| of the tensor without building tau_t where a fused
kernel can, and ``tau_of.map(fn, ts)`` runs per-task work on the engine's threads.
Called directly on whole tensors (``Method.__call__``), ``fn`` gets no ``stats`` and
computes them itself. A block-wise method may also register ``kernel(base, fts, subtract,
out, hp, stats)``: the same block computed by a fused CPU kernel (``mergeflow.kernels``)
straight from the checkpoints' dtype; the engine uses it where it applies and the merge has
at least ``kernel_min`` floating elements x tasks (see ``mergeflow.kernels``); it must give
what ``fn`` gives (tested against each other).
``storage(n, n_tasks, itemsize[, hp=..., shapes=...]) -> bytes`` gives what the method's
compact form keeps besides the base for ``n`` floating parameters per model (default: one
model for a static method, one per task for a dynamic one); declaring ``hp`` and/or
``shapes`` (name -> shape of every floating tensor) as keyword parameters gets them.
A data-driven method (CAT Merging) registers ``needs="layer_inputs"``: the caller passes
each task's layer-input statistics (``mergeflow.features.layer_input_stats`` of expert t on a
few of its exemplars, a list in task order) as ``data=`` to the engine, and ``fn`` receives them
as ``ctx``; without them the engine refuses with a one-line error.
A method over another method (LiNeS over Task Arithmetic, TVQ's quantised inputs to any
merge) takes a hyper-parameter of kind ``dict`` with that method's options and registers
``validate(hp, where)``, which ``hyper`` calls so that a bad inner option is refused before
any work starts, naming the key.
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
    kind: type | tuple[type, ...] | None = None  # allowed type(s) when not type(default); a list holds numbers
    high_open: bool = False  # the range is [low, high): ``high`` itself is refused

    def check(self, value: Any, where: str) -> Any:
        """``value`` validated (ints widened to float where a float is expected), or a one-line error."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind or type(self.default),)
        if value is None and self.default is None:
            return None
        if isinstance(value, list) and list in kinds:
            return [self._scalar(v, f"{where}[{i}]", float) for i, v in enumerate(value)]
        if dict in kinds:
            if not isinstance(value, dict):
                raise MergeflowError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        return self._scalar(value, where, next(k for k in kinds if k is not list))

    def _scalar(self, value: Any, where: str, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise MergeflowError(f"{where}: expected {kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MergeflowError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if self.low is not None and value < self.low or above:
            raise MergeflowError(f"{where}: {value!r} is outside [{self.low}, {self.high}{')' if self.high_open else ']'}")
        return value


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor | list[torch.Tensor]]
    dynamic: bool
    params: dict[str, Param]
    reference: str
    summary: str
    prepare: Callable[..., Any] | None = None
    storage: Callable[[int, int, int], int] | None = None
    blockwise: bool | Callable[[dict], bool] = False
    tensor_stats: Callable[..., Any] | None = None
    kernel: Callable[..., None] | None = None
    kernel_min: int = 0
    validate: Callable[[dict, str], None] | None = None
    needs: str | None = None

    def is_blockwise(self, hp: dict) -> bool:
        return bool(self.blockwise(hp) if callable(self.blockwise) else self.blockwise)

    def storage_bytes(self, n: int, n_tasks: int, itemsize: int = 4, hp: dict | None = None,
                      shapes: dict[str, tuple[int, ...]] | None = None) -> int:
        """Bytes the compact form keeps; a ``storage`` function that takes ``hp`` and/or ``shapes``
        (the floating tensors' shapes) as keywords gets them (quantisation bits, low ranks)."""
        if self.storage is not None:
            import inspect

            wants = inspect.signature(self.storage).parameters
            extra = {k: v for k, v in (("hp", self.hyper(hp) if "hp" in wants else None), ("shapes", shapes)) if k in wants}
            return int(self.storage(n, n_tasks, itemsize, **extra))
        return n * itemsize * (n_tasks if self.dynamic else 1)

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
        if self.validate is not None:
            self.validate(out, where)
        return out

    def __call__(self, name: str, theta0: torch.Tensor, taus: Sequence[torch.Tensor], /, **hp: Any):
        """One tensor; a method with ``prepare`` gets its context as ``ctx`` (see ``merge``)."""
        return self.fn(name, theta0, taus, **hp)


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, dynamic: bool = False, params: dict[str, Param] | None = None, reference: str = "",
             summary: str = "", prepare: Callable[..., Any] | None = None, storage: Callable[[int, int, int], int] | None = None,
             blockwise: bool | Callable[[dict], bool] = False, tensor_stats: Callable[..., Any] | None = None,
             kernel: Callable[..., None] | None = None, kernel_min: int = 0,
             validate: Callable[[dict, str], None] | None = None, needs: str | None = None):
    """Decorator adding a per-tensor merge function to the registry under ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name} registered twice")
        summary_ = summary or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Method(name, fn, dynamic, dict(params or {}), reference, summary_, prepare, storage,
                                 blockwise, tensor_stats, kernel, kernel_min, validate, needs)
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
from mergeflow.methods import (  # noqa: E402,F401
    breadcrumbs, cabs, cart, cat, dare, emr, iso, lines, task_arithmetic, tall_mask, ties, tsv, tswitch, tvq, weight_average,
)
