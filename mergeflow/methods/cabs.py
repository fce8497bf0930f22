"""CABS (Yang et al., ICML 2025, "CABS: Conflict-Aware and Balanced Sparsification for
Enhancing Model Merging"): disjoint n:m masks built task after task, then a weighted sum.

Per tensor, flattened row-major and cut into blocks of m consecutive entries, tasks are
pruned one after another in ``order``: in every block task t keeps the n entries of largest
|tau_t| among the positions no earlier task kept (balanced and conflict-aware
sparsification), so the masks are disjoint. Merged: theta_0 + sum_t lambda_t * mask_t * tau_t
(``scaling``: one lambda for every task or a list with one per task, in task order).

Defaults: m = 256, n = int(min(0.25, 1/T) * m) per block (two tasks: 64 of 256, as the
authors' released 7B merges; 8 tasks: 32). Give ``density`` (n = floor(density * m)) or
``n``, not both. ``scaling`` 1.0 (the authors tune lambda per task).
Ties, the short tail block, quotas, the authors' code: docs/method-notes.md#cabs.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods import Hp, register

REFERENCE = "Yang et al., CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model Merging, ICML 2025"
DEFAULT_M = 256
DEFAULT_DENSITY = 0.25


def block_quota(hp: dict, n_tasks: int) -> int:
    """n, the entries each task keeps per full block of m."""
    m = hp["m"]
    if hp.get("n") is not None:
        return int(hp["n"])
    density = hp["density"] if hp.get("density") is not None else min(DEFAULT_DENSITY, 1.0 / n_tasks)
    return int(density * m + 1e-9)


def task_order(order, n_tasks: int) -> list[int]:
    if order is None:
        return list(range(n_tasks))
    got = [int(v) for v in order]
    if sorted(got) != list(range(n_tasks)):
        raise MergeflowError(f"order: {got} is not an order of the {n_tasks} tasks (a permutation of 0..{n_tasks - 1})")
    return got


def lambdas(value, n_tasks: int) -> list[float]:
    if isinstance(value, list):
        if len(value) != n_tasks:
            raise MergeflowError(f"scaling: {len(value)} values given for {n_tasks} tasks")
        return [float(v) for v in value]
    return [float(value)] * n_tasks


def _keys(tau: torch.Tensor, m: int) -> torch.Tensor:
    """int64 keys ordering the entries of each block by |tau| descending, then index ascending:
    the float32 bit pattern of |tau| (monotonic for non-negative floats) times m, plus
    m-1-(position in block). All distinct inside a block, so top-k is exact and deterministic."""
    flat = tau.reshape(-1).float().abs()
    bits = flat.view(torch.int32).to(torch.int64)
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % m
    return bits * m + (m - 1 - pos)


def _top_in_blocks(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys of each row (keys < 0 are not candidates and never kept)."""
    if k <= 0 or keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    k = min(k, keys.shape[1])
    top = keys.topk(k, dim=1, sorted=False).indices
    chosen = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, top, True)
    return chosen & (keys >= 0)


def cabs_masks(taus: Sequence[torch.Tensor], n: int, m: int, order: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per task (task order, whatever the pruning ``order``), its bool mask of tau's shape:
    n:m magnitude pruning among the positions the tasks earlier in ``order`` left free."""
    shape, numel = taus[0].shape, taus[0].numel()
    full, r = divmod(numel, m)
    n_tail = n * r // m
    claimed = torch.zeros(numel, dtype=torch.bool, device=taus[0].device)
    masks: list[torch.Tensor | None] = [None] * len(taus)
    for t in range(len(taus)) if order is None else order:
        keys = _keys(taus[t], m).masked_fill_(claimed, -1)
        mask = torch.empty_like(claimed)
        mask[: full * m] = _top_in_blocks(keys[: full * m].view(full, m), n).view(-1)
        mask[full * m :] = _top_in_blocks(keys[full * m :].view(1, r), n_tail).view(-1)
        claimed |= mask
        masks[t] = mask.view(shape)
    done = [mk for mk in masks if mk is not None]
    assert len(done) == len(taus)  # order is a permutation of the tasks (task_order checks it)
    return done


def _validate(hp: dict, where: str) -> None:
    if hp["n"] is not None:
        if hp["n"] > hp["m"]:
            raise MergeflowError(f"{where}n: {hp['n']} is more than m = {hp['m']}")
        if hp["density"] is not None:
            raise MergeflowError(f"{where}n: give density or n, not both (n = floor(density * m))")
    if hp["order"] is not None:
        got = hp["order"]
        if not isinstance(got, list):
            raise MergeflowError(f"{where}order: expected a list of task indices, got {got!r}")
        if any(v != int(v) or v < 0 for v in got) or len(set(got)) != len(got):
            shown = [int(v) if v == int(v) else v for v in got]
            raise MergeflowError(f"{where}order: {shown} must list distinct task indices (0-based)")
        hp["order"] = [int(v) for v in got]


@register(
    "cabs",
    reference=REFERENCE,
    validate=_validate,
)
def cabs(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    density: Annotated[
        float | None, Hp("share of each task vector kept, n/m (default min(0.25, 1/T))", low=0.0, high=1.0)
    ] = None,
    n: Annotated[int | None, Hp("entries kept per block of m (default floor(density * m))", low=0)] = None,
    m: Annotated[int, Hp("block size of the n:m balanced sparsification", low=1, high=1 << 16)] = DEFAULT_M,
    order: Annotated[list[int] | None, Hp("task indices in pruning order (default 0, 1, ..., T-1)", low=0)] = None,
    scaling: Annotated[
        float | list[float], Hp("lambda on the masked task vectors (a number, or a list with one per task)", low=0.0, high=10.0)
    ] = 1.0,
) -> torch.Tensor:
    """Disjoint n:m masks task after task (conflict-aware, balanced), then a weighted sum."""
    hp = {"density": density, "n": n, "m": m}
    lam = lambdas(scaling, len(taus))
    masks = cabs_masks(taus, block_quota(hp, len(taus)), m, task_order(order, len(taus)))
    out = torch.zeros_like(taus[0], dtype=torch.float32)
    for tau, mask, l in zip(taus, masks, lam):
        out.add_(tau.float() * mask, alpha=l)
    return out
