"""EMR-Merging (Huang et al., NeurIPS 2024): elect, mask, rescale; one model per task.

sigma = sign(sum_t tau_t); tau_uni = sigma * (per entry, the largest |tau_t| among the tasks
whose sign agrees with sigma); mask M_t = [tau_t * sigma > 0]; rescaler lambda_t from the
whole model, as the authors' code computes it (``rescale: mean``: sum over tensors of
mean|tau_t| divided by sum over tensors of mean|M_t * tau_uni|) or by the paper's equation
(``rescale: global``: the same with sums over all entries). Task model theta_0 + lambda_t *
M_t * tau_uni. Stored: tau_uni, one bit per entry and task, one float per task.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from mergeflow.methods import Hp, register


def unify(taus: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_uni, masks M_t) of one tensor."""
    sigma = torch.sign(torch.stack(list(taus)).sum(0))
    mag = torch.zeros_like(sigma)
    masks = []
    for tau in taus:
        agree = tau * sigma > 0
        masks.append(agree)
        mag = torch.maximum(mag, tau.abs() * agree)
    return sigma * mag, masks


def prepare_emr(stream, hp) -> dict:
    """One pass over the model: the rescaler lambda_t of every task."""
    num = den = None
    for _, _, taus in stream():
        uni, masks = unify(taus)
        if hp["rescale"] == "mean":
            a = [float(t.abs().mean()) for t in taus]
            b = [float((uni * m).abs().mean()) for m in masks]
        else:
            a = [float(t.abs().double().sum()) for t in taus]
            b = [float((uni * m).abs().double().sum()) for m in masks]
        num = [x + y for x, y in zip(num or [0.0] * len(a), a)]
        den = [x + y for x, y in zip(den or [0.0] * len(b), b)]
    return {"rescalers": [n / d if d > 0 else 0.0 for n, d in zip(num or [], den or [])]}


def _storage(n: int, n_tasks: int, itemsize: int) -> int:
    return n * 4 + n_tasks * ((n + 7) // 8 + 4)


@register(
    "emr",
    kind="dynamic",
    reference="Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024",
    prepare=prepare_emr,
    storage=_storage,
)
def emr(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    rescale: Annotated[
        Literal["mean", "global"], Hp("rescaler as the authors' code (mean per tensor) or the paper's equation (global)")
    ] = "mean",
    ctx: dict | None = None,
) -> list[torch.Tensor]:
    """Unified task vector with per-task masks and rescalers (task identity known)."""
    assert ctx is not None  # prepare_emr always runs first
    uni, masks = unify(taus)
    return [uni * m * lam for m, lam in zip(masks, ctx["rescalers"])]
