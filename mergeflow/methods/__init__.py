"""The merging methods: every module here registers one or more (docs/adding-a-method.md).

A method is ``fn(name, base, taus, *, <hyper-parameters>, ctx=None, stats=None)`` over one
tensor at a time, decorated with ``@register``; its hyper-parameters are its typed keyword
arguments (``Annotated[float, Hp(...)]``). The contract, hooks and capabilities are described
in docs/method-contract.md. Every module of this package is imported (so registered) on first
import: a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeflow.methods.hparams import Hp, Param, params_of
from mergeflow.methods.jobs import EvalJob, MergeJob
from mergeflow.methods.registry import DATA, KINDS, Method, get, names, register

__all__ = ["DATA", "KINDS", "EvalJob", "Hp", "MergeJob", "Method", "Param", "get", "names", "params_of", "register"]

_SUPPORT = {"hparams", "jobs", "registry"}  # the registry's own modules


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in _SUPPORT and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
