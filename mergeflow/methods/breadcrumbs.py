"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop both tails, then Task Arithmetic.

Per tensor and task, the smallest ``beta`` share of |tau_t| (noise) and the largest
``gamma`` share (outliers) are zeroed; what is left is summed with ``scaling``. Entries tied
at either threshold fall on the dropped side of the top threshold and the kept side of the
bottom one (both thresholds keep ties, as every selection here does).
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch

from mergeflow.methods import Hp, register
from mergeflow.select import topk_mask


def breadcrumb_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """True where |tau| is neither among the smallest ``beta`` share nor the largest ``gamma`` share."""
    mag, n = tau.abs(), tau.numel()
    keep = topk_mask(mag, n - int(beta * n))
    n_top = int(gamma * n)
    return keep & ~topk_mask(mag, n_top) if n_top else keep


@register(
    "breadcrumbs",
    reference="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024",
)
def breadcrumbs(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    beta: Annotated[float, Hp("share of smallest-magnitude entries dropped per tensor", low=0.0, high=1.0)] = 0.85,
    gamma: Annotated[float, Hp("share of largest-magnitude entries (outliers) dropped per tensor", low=0.0, high=1.0)] = 0.01,
    scaling: Annotated[float, Hp("coefficient on the summed masked task vectors", low=0.0, high=10.0)] = 0.3,
) -> torch.Tensor:
    """Mask both magnitude tails of each task vector, then Task Arithmetic."""
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau * breadcrumb_mask(tau, beta, gamma)
    return total * scaling
