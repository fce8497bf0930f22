"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information").

tau_MTL is the merged task vector of ``merge`` (Task Arithmetic: sum_t tau_t; TIES: the
disjoint mean of the trimmed vectors). TALL mask of task t:
m_t = [|tau_t| >= lambda_t * |tau_MTL - tau_t|] (the paper's form, comparing |tau_t|).
- ``tall_mask`` (dynamic): task model theta_0 + ``scaling`` * m_t * tau_MTL.
- ``consensus`` (static): keep the weights whose mask is on for at least ``k`` tasks,
  theta_0 + ``scaling`` * m_consensus * tau_MTL (``scaling`` defaults to the base method's:
  0.3 for Task Arithmetic, 1.0 for TIES).
``threshold`` (the paper's lambda; ``lambda`` is accepted) is one value for every task or a list with one per task (the pipeline can pick
each from {0.2, ..., 0.6} on validation data).
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods import Hp, register
from mergeflow.methods.ties import Density, disjoint_mean, trim

REFERENCE = "Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024"
Merge = Annotated[Literal["task_arithmetic", "ties"], Hp("the merge giving tau_MTL", aliases=("base",))]
Threshold = Annotated[
    float | list[float],
    Hp("TALL mask threshold lambda (a number, or a list with one per task)", low=0.0, high=100.0, aliases=("lambda",)),
]


def multitask_vector(taus: Sequence[torch.Tensor], merge: str, density: float) -> torch.Tensor:
    if merge == "ties":
        return disjoint_mean([trim(t, density) for t in taus])
    return torch.stack(list(taus)).sum(0)


def lambdas(value, n_tasks: int) -> list[float]:
    if isinstance(value, list):
        if len(value) != n_tasks:
            raise MergeflowError(f"threshold: {len(value)} values given for {n_tasks} tasks")
        return [float(v) for v in value]
    return [float(value)] * n_tasks


def tall_masks(taus: Sequence[torch.Tensor], mtl: torch.Tensor, lam: Sequence[float]) -> list[torch.Tensor]:
    return [tau.abs() >= l * (mtl - tau).abs() for tau, l in zip(taus, lam)]


def _storage(n: int, n_tasks: int, itemsize: int) -> int:
    return n * itemsize + n_tasks * ((n + 7) // 8)


@register(
    "tall_mask",
    kind="dynamic",
    reference=REFERENCE,
    storage=_storage,
)
def tall_mask(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    threshold: Threshold = 0.4,
    merge: Merge = "task_arithmetic",
    density: Density = 0.2,
    scaling: Annotated[float, Hp("coefficient on the masked multi-task vector", low=0.0, high=10.0)] = 1.0,
) -> list[torch.Tensor]:
    """Per-task masks over the merged task vector (task identity known)."""
    mtl = multitask_vector(taus, merge, density)
    return [m * mtl * scaling for m in tall_masks(taus, mtl, lambdas(threshold, len(taus)))]


@register(
    "consensus",
    reference=REFERENCE,
)
def consensus(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    k: Annotated[int, Hp("least number of tasks whose TALL mask must hold a weight", low=0)] = 2,
    threshold: Threshold = 0.4,
    merge: Merge = "task_arithmetic",
    density: Density = 0.2,
    scaling: Annotated[
        float | None, Hp("coefficient (default: 0.3 with task_arithmetic, 1.0 with ties)", low=0.0, high=10.0)
    ] = None,
) -> torch.Tensor:
    """Drop weights that fewer than k tasks use (selfish and catastrophic weights), then TA or TIES."""
    mtl = multitask_vector(taus, merge, density)
    votes = torch.zeros_like(mtl)
    for m in tall_masks(taus, mtl, lambdas(threshold, len(taus))):
        votes += m
    coef = scaling if scaling is not None else (1.0 if merge == "ties" else 0.3)
    return mtl * (votes >= k) * coef
