"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop both tails, then Task Arithmetic.

Per tensor and task, the smallest ``beta`` share of |tau_t| (noise) and the largest
``gamma`` share (outliers) are zeroed; what is left is summed with ``scaling``. Entries tied
at either threshold fall on the dropped side of the top threshold and the kept side of the
bottom one (both thresholds keep ties, as every selection here does).
"""
from __future__ import annotations

import torch

from mergeflow.methods import Param, register
from mergeflow.select import topk_mask


def breadcrumb_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """True where |tau| is neither among the smallest ``beta`` share nor the largest ``gamma`` share."""
    mag, n = tau.abs(), tau.numel()
    keep = topk_mask(mag, n - int(beta * n))
    n_top = int(gamma * n)
    return keep & ~topk_mask(mag, n_top) if n_top else keep


@register(
    "breadcrumbs",
    params={
        "beta": Param(0.85, "share of smallest-magnitude entries dropped per tensor", low=0.0, high=1.0),
        "gamma": Param(0.01, "share of largest-magnitude entries (outliers) dropped per tensor", low=0.0, high=1.0),
        "scaling": Param(0.3, "coefficient on the summed masked task vectors", low=0.0, high=10.0),
    },
    reference="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024",
)
def breadcrumbs(name, base, taus, beta, gamma, scaling):
    """Mask both magnitude tails of each task vector, then Task Arithmetic."""
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau * breadcrumb_mask(tau, beta, gamma)
    return total * scaling
