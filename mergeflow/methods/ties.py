"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

1. Trim: keep each tau_t's top ``density`` share by magnitude (ties at the threshold kept),
   per tensor (as mergekit and PEFT do) or, with ``scope: global``, across the whole model.
2. Elect: gamma = sign(sum_t trimmed tau_t).
3. Disjoint mean: per entry, the mean of the trimmed entries whose sign equals gamma.
Result theta_0 + ``scaling`` * that. The helpers here are shared by DARE, TALL masks and
Consensus merging.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from mergeflow import kernels
from mergeflow.methods import Hp, register
from mergeflow.select import global_thresholds, magnitude_mask

Density = Annotated[float, Hp("share of each task vector kept by magnitude (trim)", low=0.0, high=1.0)]
Scope = Annotated[Literal["tensor", "global"], Hp("trim threshold per tensor, or one across the whole model")]
Scaling = Annotated[float, Hp("coefficient on the merged task vector", low=0.0, high=10.0)]
REFERENCE = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"


def trim(tau: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """tau with all but its top ``density`` share (or the entries below ``threshold``) zeroed."""
    if threshold is not None:
        return tau * (tau.abs() >= float(threshold))
    if density >= 1.0:
        return tau
    return tau * magnitude_mask(tau, int(density * tau.numel()))


def disjoint_mean(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elect gamma = sign(sum), then average per entry the values whose sign equals gamma."""
    gamma = trimmed[0].clone()
    for t in trimmed[1:]:
        gamma += t
    gamma.sign_()
    num = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma)
    for t in trimmed:
        agree = torch.mul(t, gamma) > 0
        num.addcmul_(t, agree)
        count += agree
    return num.div_(count.clamp_(min=1))


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


def trim_thresholds(name, tau_of, n_tasks: int, hp, ctx) -> dict:
    """Per-tensor stats for block-wise TIES: each task's trim threshold on this tensor
    (|tau| >= threshold is kept; +inf keeps nothing, 0 everything), the tasks in parallel."""
    if (ctx or {}).get("thresholds"):
        return {"thresholds": ctx["thresholds"]}
    density = hp["density"]

    def threshold(t: int) -> float:
        n = tau_of.numel
        k = int(density * n)
        if k >= n:
            return 0.0
        return float("inf") if k == 0 else tau_of.kth_abs(t, k)

    return {"thresholds": [torch.tensor(x, dtype=torch.float32) for x in tau_of.map(threshold, range(n_tasks))]}


def _kernel(base, fts, subtract, out, hp, stats):
    kernels.ties_block(base, fts, subtract, [float(x) for x in stats["thresholds"]], hp["scaling"], out)


def ties_vector(taus: Sequence[torch.Tensor], density: float, ctx: dict | None = None, stats: dict | None = None) -> torch.Tensor:
    """The merged TIES task vector of one tensor or block (before ``scaling``)."""
    thresholds = (stats or ctx or {}).get("thresholds")
    trimmed = [trim(t, density, thresholds[i] if thresholds else None) for i, t in enumerate(taus)]
    return disjoint_mean(trimmed)


@register(
    "ties",
    reference=REFERENCE,
    prepare=prepare_ties,
    blockwise=True,
    tensor_stats=trim_thresholds,
    kernel=_kernel,
)
def ties(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    density: Density = 0.2,
    scaling: Scaling = 1.0,
    scope: Scope = "tensor",
    ctx: dict | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Trim each task vector, elect signs, average the agreeing entries."""
    return ties_vector(taus, density, ctx, stats).mul_(scaling)
