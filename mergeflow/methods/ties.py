"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

1. Trim: keep each tau_t's top ``density`` share by magnitude (ties at the threshold kept),
   per tensor (as mergekit and PEFT do) or, with ``scope: global``, across the whole model.
2. Elect: gamma = sign(sum_t trimmed tau_t).
3. Disjoint mean: per entry, the mean of the trimmed entries whose sign equals gamma.
Result theta_0 + ``scaling`` * that. The helpers here are shared by DARE, TALL masks and
Consensus merging.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mergeflow.methods import Param, register
from mergeflow.select import global_thresholds, magnitude_mask

DENSITY = Param(0.2, "share of each task vector kept by magnitude (trim)", low=0.0, high=1.0)
SCOPE = Param("tensor", "trim threshold per tensor, or one across the whole model", choices=("tensor", "global"))
REFERENCE = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"


def trim(tau: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """tau with all but its top ``density`` share (or the entries below ``threshold``) zeroed."""
    if threshold is not None:
        return tau * (tau.abs() >= threshold.to(tau.device))
    if density >= 1.0:
        return tau
    return tau * magnitude_mask(tau, int(density * tau.numel()))


def disjoint_mean(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elect gamma = sign(sum), then average per entry the values whose sign equals gamma."""
    gamma = torch.sign(torch.stack(list(trimmed)).sum(0)) if len(trimmed) < 3 else torch.sign(_sum(trimmed))
    num = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma)
    for t in trimmed:
        agree = (t * gamma) > 0
        num += t * agree
        count += agree
    return num / count.clamp(min=1)


def _sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total


def global_trim_thresholds(stream, density: float) -> list[torch.Tensor]:
    """Per task, the |tau_t| threshold keeping its top ``density`` share over the whole model."""
    counts: list[int] = []
    for _, _, taus in stream():
        counts = [c + t.numel() for c, t in zip(counts or [0] * len(taus), taus)]
    return global_thresholds(lambda: (taus for _, _, taus in stream()), [int(density * n) for n in counts])


def prepare_ties(stream, hp) -> dict:
    """Global scope needs every task's model-wide threshold first (two histogram passes)."""
    if hp.get("scope") != "global" or hp["density"] >= 1.0:
        return {}
    return {"thresholds": global_trim_thresholds(stream, hp["density"])}


def ties_vector(taus: Sequence[torch.Tensor], density: float, ctx: dict | None = None) -> torch.Tensor:
    """The merged TIES task vector of one tensor (before ``scaling``)."""
    thresholds = (ctx or {}).get("thresholds")
    trimmed = [trim(t, density, thresholds[i] if thresholds else None) for i, t in enumerate(taus)]
    return disjoint_mean(trimmed)


@register(
    "ties",
    params={"density": DENSITY, "scaling": Param(1.0, "coefficient on the merged task vector", low=0.0, high=10.0), "scope": SCOPE},
    reference=REFERENCE,
    prepare=prepare_ties,
)
def ties(name, base, taus, density, scaling, scope, ctx=None):
    """Trim each task vector, elect signs, average the agreeing entries."""
    return ties_vector(taus, density, ctx) * scaling
