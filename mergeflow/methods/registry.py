"""The method registry: one decorator, one record per method (docs/method-contract.md).

``@register(name, ...)`` over ``fn(name, base, taus, *, <hyper-parameters>, ctx=None, stats=None)``
records the method; its hyper-parameters come from the signature (``hparams.params_of``), its
capabilities (``kind``, ``data``, ``transductive``, ``trains``) and hooks from the decorator.
Stages, params, tracking and the CLI read these fields and never a method's name.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Literal, Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods.hparams import RESERVED, Param, params_of

Kind = Literal["static", "dynamic", "routed"]
Data = Literal["none", "layer_inputs", "unlabelled", "labelled", "gradients"]
KINDS: tuple[str, ...] = ("static", "dynamic", "routed")
DATA: tuple[str, ...] = ("none", "layer_inputs", "unlabelled", "labelled", "gradients")
POSITIONAL = ("name", "base", "taus")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor | list[torch.Tensor]]
    kind: Kind
    params: dict[str, Param]
    reference: str
    summary: str
    data: Data = "none"  # what the merge needs besides the task vectors
    transductive: bool = False  # uses the test inputs (reported apart)
    trains: bool = False  # runs an optimiser
    prepare: Callable[..., Any] | None = None
    storage: Callable[..., int] | None = None
    blockwise: bool | Callable[[dict], bool] = False
    tensor_stats: Callable[..., Any] | None = None
    kernel: Callable[..., None] | None = None
    kernel_min: int = 0
    validate: Callable[[dict, str], None] | None = None
    set_by: dict[str, str] = dataclasses.field(default_factory=dict)  # hyper-parameter -> the params key setting it
    write: Callable[..., dict] | None = None  # merge stage: write the method's own artifacts (jobs.MergeJob)
    models: Callable[..., Any] | None = None  # evaluate stage: (task, state dict) per task (jobs.EvalJob)
    evaluate: Callable[..., dict] | None = None  # evaluate stage: {row: {scores, extra}} (jobs.EvalJob)
    compact: Callable[..., None] | None = None  # `mergeflow merge --set store=switches`
    codec: Callable[..., Any] | None = None  # compress stage: one task vector's compact form
    wants: frozenset[str] = frozenset()  # which of ``ctx``/``stats`` fn accepts

    @property
    def dynamic(self) -> bool:
        """One model per task (or routed per input) rather than one model."""
        return self.kind != "static"

    @property
    def needs(self) -> str | None:
        return None if self.data == "none" else self.data

    @property
    def capabilities(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": self.data, "transductive": self.transductive, "trains": self.trains}

    def is_blockwise(self, hp: dict) -> bool:
        return bool(self.blockwise(hp) if callable(self.blockwise) else self.blockwise)

    def storage_bytes(
        self, n: int, n_tasks: int, itemsize: int = 4, hp: dict | None = None, shapes: dict[str, tuple[int, ...]] | None = None
    ) -> int:
        """Bytes the compact form keeps; a ``storage`` function that takes ``hp`` and/or ``shapes``
        (the floating tensors' shapes) as keywords gets them (quantisation bits, low ranks)."""
        if self.storage is not None:
            wants = inspect.signature(self.storage).parameters
            extra = {k: v for k, v in (("hp", self.hyper(hp) if "hp" in wants else None), ("shapes", shapes)) if k in wants}
            return int(self.storage(n, n_tasks, itemsize, **extra))
        return n * itemsize * (n_tasks if self.dynamic else 1)

    def canonical(self, given: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
        """``given`` with old spellings (``Hp.aliases``) renamed; both spellings at once is an error."""
        out = dict(given or {})
        for key, spec in self.params.items():
            for old in spec.aliases:
                if old in out:
                    if key in out:
                        raise MergeflowError(f"{where}{old}: the old name of {key}, given beside it")
                    out[key] = out.pop(old)
        return out

    def hyper(self, given: dict[str, Any] | None = None, where: str = "") -> dict[str, Any]:
        """Defaults overlaid with ``given``, each checked; unknown names are an error naming the key."""
        given = self.canonical(given, where)
        out = {}
        for key, spec in self.params.items():
            out[key] = spec.check(given.pop(key), f"{where}{key}") if key in given else copy.deepcopy(spec.default)
        if given:
            key = sorted(given)[0]
            known = ", ".join(self.params) or "none"
            raise MergeflowError(f"{where}{key}: unknown hyper-parameter of {self.name} (known: {known})")
        if self.validate is not None:
            self.validate(out, where)
        return out

    def __call__(
        self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], /, ctx: Any = None, stats: Any = None, **hp: Any
    ):
        """One tensor: the merged task vector (static) or one per task; ``ctx``/``stats`` as the engine gives."""
        extra = {k: v for k, v in (("ctx", ctx), ("stats", stats)) if k in self.wants}
        return self.fn(name, base, taus, **hp, **extra)


_REGISTRY: dict[str, Method] = {}


def _check_signature(name: str, fn: Callable[..., Any]) -> frozenset[str]:
    sig = list(inspect.signature(fn).parameters.values())
    head = [p.name for p in sig[:3]]
    if head != list(POSITIONAL) or any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig[:3]):
        raise TypeError(f"method {name}: signature must start with (name, base, taus), got ({', '.join(head)})")
    for p in sig[3:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"method {name}: {p.name} must be keyword-only (after `*`)")
    return frozenset(p.name for p in sig if p.name in RESERVED)


def register(
    name: str,
    *,
    kind: Kind = "static",
    reference: str = "",
    summary: str = "",
    data: Data = "none",
    transductive: bool = False,
    trains: bool = False,
    **hooks: Any,
) -> Callable:
    """Decorator adding a per-tensor merge function to the registry under ``name``; ``hooks`` are
    the optional ``Method`` fields (prepare, storage, blockwise, ..., write, evaluate, compact)."""
    if kind not in KINDS or data not in DATA:
        raise TypeError(f"method {name}: kind must be one of {KINDS} and data one of {DATA}")
    hookable = {f.name for f in dataclasses.fields(Method)} - {"wants"}  # wants is derived from the signature
    unknown = set(hooks) - hookable
    if unknown:
        raise TypeError(f"method {name}: unknown register options {sorted(unknown)}")

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name} registered twice")
        wants = _check_signature(name, fn)
        if (hooks.get("prepare") or data != "none") and "ctx" not in wants:
            raise TypeError(f"method {name}: a method with prepare or data takes ctx")
        if hooks.get("tensor_stats") and "stats" not in wants:
            raise TypeError(f"method {name}: a method with tensor_stats takes stats")
        summary_ = summary or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Method(
            name, fn, kind, params_of(fn), reference, summary_, data, transductive, trains, wants=wants, **hooks
        )
        return fn

    return wrap


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeflowError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)
