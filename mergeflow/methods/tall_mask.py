"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information").

tau_MTL is the merged task vector of ``base`` (Task Arithmetic: sum_t tau_t; TIES: the
disjoint mean of the trimmed vectors). TALL mask of task t:
m_t = [|tau_t| >= lambda_t * |tau_MTL - tau_t|] (the paper's form, comparing |tau_t|).
- ``tall_mask`` (dynamic): task model theta_0 + ``scaling`` * m_t * tau_MTL.
- ``consensus`` (static): keep the weights whose mask is on for at least ``k`` tasks,
  theta_0 + ``scaling`` * m_consensus * tau_MTL (``scaling`` defaults to the base method's:
  0.3 for Task Arithmetic, 1.0 for TIES).
``lambda`` is one value for every task or a list with one per task (the pipeline can pick
each from {0.2, ..., 0.6} on validation data).
"""
from __future__ import annotations

from typing import Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods import Param, register
from mergeflow.methods.ties import DENSITY, disjoint_mean, trim

REFERENCE = "Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024"
BASE = Param("task_arithmetic", "the merge giving tau_MTL", choices=("task_arithmetic", "ties"))
LAMBDA = Param(0.4, "TALL mask threshold lambda (a number, or a list with one per task)", low=0.0, high=100.0, kind=(float, list))


def multitask_vector(taus: Sequence[torch.Tensor], base: str, density: float) -> torch.Tensor:
    if base == "ties":
        return disjoint_mean([trim(t, density) for t in taus])
    return torch.stack(list(taus)).sum(0)


def lambdas(value, n_tasks: int) -> list[float]:
    if isinstance(value, list):
        if len(value) != n_tasks:
            raise MergeflowError(f"lambda: {len(value)} values given for {n_tasks} tasks")
        return [float(v) for v in value]
    return [float(value)] * n_tasks


def tall_masks(taus: Sequence[torch.Tensor], mtl: torch.Tensor, lam: Sequence[float]) -> list[torch.Tensor]:
    return [tau.abs() >= l * (mtl - tau).abs() for tau, l in zip(taus, lam)]


def _storage(n: int, n_tasks: int, itemsize: int) -> int:
    return n * itemsize + n_tasks * ((n + 7) // 8)


@register(
    "tall_mask",
    dynamic=True,
    params={"lambda": LAMBDA, "base": BASE, "density": DENSITY,
            "scaling": Param(1.0, "coefficient on the masked multi-task vector", low=0.0, high=10.0)},
    reference=REFERENCE,
    storage=_storage,
)
def tall_mask(name, theta0, taus, **hp):
    """Per-task masks over the merged task vector (task identity known)."""
    mtl = multitask_vector(taus, hp["base"], hp["density"])
    return [m * mtl * hp["scaling"] for m in tall_masks(taus, mtl, lambdas(hp["lambda"], len(taus)))]


@register(
    "consensus",
    params={"k": Param(2, "least number of tasks whose TALL mask must hold a weight", low=0),
            "lambda": LAMBDA, "base": BASE, "density": DENSITY,
            "scaling": Param(None, "coefficient (default: 0.3 with task_arithmetic, 1.0 with ties)", low=0.0, high=10.0, kind=float)},
    reference=REFERENCE,
)
def consensus(name, theta0, taus, **hp):
    """Drop weights that fewer than k tasks use (selfish and catastrophic weights), then TA or TIES."""
    mtl = multitask_vector(taus, hp["base"], hp["density"])
    votes = torch.zeros_like(mtl)
    for m in tall_masks(taus, mtl, lambdas(hp["lambda"], len(taus))):
        votes += m
    scaling = hp["scaling"] if hp["scaling"] is not None else (1.0 if hp["base"] == "ties" else 0.3)
    return mtl * (votes >= hp["k"]) * scaling
