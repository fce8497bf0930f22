"""CART, Centered Arithmetic with Rank-reduced Task vectors (Choi et al., "Revisiting Weight
Averaging for Model Merging", arXiv:2412.12153, 2024).

Weight averaging is task arithmetic about the average: theta_avg = mean_t theta_t, centred
task vectors theta_t - theta_avg (they sum to zero). CART keeps each centred vector's top-k
singular triplets:

    theta = theta_avg + ``scaling`` * sum_t SVD_k(theta_t - theta_avg)

per 2-D tensor, k = ceil(``rank_ratio`` * r), r = min(m, n); other tensors: theta_avg.
Defaults: ``rank_ratio`` 0.08 (the paper's best), ``scaling`` (the paper's lambda) 1.0.
Details (k's edge cases, the task-vector form, the defaults' sources): docs/method-notes.md#cart.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch

from mergeflow.methods import Hp, register
from mergeflow.methods._svd import ceil_count, is_matrix, low_rank, rank_of, svd


@register(
    "cart",
    reference="Choi et al., Revisiting Weight Averaging for Model Merging, arXiv:2412.12153, 2024",
)
def cart(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    rank_ratio: Annotated[float, Hp("share of the rank kept of each centred task vector", low=0.0, high=1.0)] = 0.08,
    scaling: Annotated[float, Hp("lambda: coefficient on the summed low-rank centred task vectors", low=0.0, high=10.0)] = 1.0,
) -> torch.Tensor:
    """Weight average plus the low-rank parts of the task vectors centred on it."""
    stacked = torch.stack(list(taus))
    avg = stacked.mean(0)
    if not is_matrix(name, taus[0]):
        return avg
    k = ceil_count(rank_ratio, rank_of(avg.shape))
    if k == 0 or scaling == 0.0:
        return avg
    u, s, vh = svd(stacked - avg)
    return avg.add_(low_rank(u, s, vh, k).sum(0), alpha=scaling)
