"""LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging"): layer-increasing scaling of a merged task vector.

Block l (0-based) of the L blocks of the main stack (``mergeflow.layers``) gets

    lambda(l) = alpha + beta * l / (L - 1)          (the paper's alpha + beta (l-1)/(L-1), 1-based)

names outside the stack get alpha, and with L = 1 every tensor does. The result is
lambda(l) * merge(taus; options, scaling = 1): the merge named by ``merge`` (task_arithmetic,
ties or consensus) runs unscaled, so ``options.scaling`` is refused; its other options are
validated by that method before any work starts. ``alpha`` defaults to the paper's rule
(1/T) ||sum_t tau_t||_1 / ||tau_MTL||_1 (1/T for Task Arithmetic; one ``prepare`` pass for
TIES and Consensus); ``beta`` 0.5, the middle of the authors' Task Arithmetic grid, not a
reported optimum: tune it. Details: docs/method-notes.md#lines.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.layers import layer_depths
from mergeflow.methods import Hp, register

REFERENCE = "Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, ICLR 2025"


def factor(l: int, L: int, alpha: float, beta: float) -> float:
    """lambda(l) = alpha + beta * l / (L - 1) for 0-based block l of L (alpha when L == 1)."""
    return alpha + (beta * l / (L - 1) if L > 1 else 0.0)


def _validate(hp: dict, where: str) -> None:
    opts = dict(hp["options"] or {})
    if "scaling" in opts:
        raise MergeflowError(
            f"{where}options.scaling: lines replaces the base method's scaling by "
            f"alpha + beta*l/(L-1); set alpha and beta instead"
        )
    checked = methods.get(hp["merge"]).hyper(opts, where=f"{where}options.")
    checked.pop("scaling", None)  # the base runs with scaling 1 (see the module doc)
    hp["options"] = checked


def _inner(hp: dict) -> tuple[methods.Method, dict]:
    """The base method and its hyper-parameters with scaling 1."""
    inner = methods.get(hp["merge"])
    inner_hp = dict(hp["options"])
    if "scaling" in inner.params:
        inner_hp["scaling"] = 1.0
    return inner, inner_hp


def _run_inner(inner: methods.Method, inner_hp: dict, name: str, theta0, taus, base_ctx) -> torch.Tensor:
    return inner(name, theta0, taus, ctx=base_ctx, **inner_hp)


def prepare_lines(stream, hp) -> dict[str, Any]:
    """Depth map from the stream's names, the base method's own context, and alpha by the
    paper's rule when not given (one pass running the base on every tensor; none for TA)."""
    inner, inner_hp = _inner(hp)
    base_ctx = inner.prepare(stream, dict(inner_hp)) if inner.prepare is not None else None
    alpha = hp["alpha"]
    need_norms = alpha is None and hp["merge"] != "task_arithmetic"
    names: list[str] = []
    summed = merged = 0.0
    n_tasks = 0
    known = getattr(stream, "names", None)  # the engine says which tensors it will stream
    if known is not None and not need_norms:
        return {"depths": layer_depths(list(known)), "alpha": alpha, "base_ctx": base_ctx}
    for name, theta0, taus in stream():
        names.append(name)
        if need_norms:
            n_tasks = len(taus)
            total = taus[0].double().clone()
            for tau in taus[1:]:
                total += tau
            summed += float(total.abs().sum())
            merged += float(_run_inner(inner, inner_hp, name, theta0, taus, base_ctx).double().abs().sum())
    if need_norms:
        alpha = (summed / merged if merged > 0 else 1.0) / max(n_tasks, 1)
    return {"depths": layer_depths(names), "alpha": alpha, "base_ctx": base_ctx}


@register(
    "lines",
    reference=REFERENCE,
    prepare=prepare_lines,
    validate=_validate,
)
def lines(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    merge: Annotated[
        Literal["task_arithmetic", "ties", "consensus"], Hp("the merge whose task vector is scaled per layer", aliases=("base",))
    ] = "task_arithmetic",
    options: Annotated[dict, Hp("hyper-parameters of the merge (its scaling excepted)")] = {},  # copied per call by hyper()
    alpha: Annotated[
        float | None,
        Hp(
            "factor of the first block and of the names outside the block stack "
            "(default: the paper's rule, (1/T) ||sum tau||_1 / ||tau_MTL||_1)",
            low=0.0,
            high=10.0,
        ),
    ] = None,
    beta: Annotated[
        float, Hp("added factor of the last block (lambda(l) = alpha + beta l/(L-1)); tune on validation", low=0.0, high=10.0)
    ] = 0.5,
    ctx: dict | None = None,
) -> torch.Tensor:
    """The merge's task vector scaled by alpha + beta * l/(L-1) at block l of L."""
    assert ctx is not None  # prepare_lines always runs first
    inner, inner_hp = _inner({"merge": merge, "options": options})
    merged = _run_inner(inner, inner_hp, name, base, taus, ctx["base_ctx"])
    a = ctx["alpha"] if ctx["alpha"] is not None else 1.0 / len(taus)
    l, L = ctx["depths"].get(name, (0, 1))
    return merged.mul_(factor(l, L, a, beta))
