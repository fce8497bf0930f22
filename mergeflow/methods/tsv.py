"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-M (merge) and TSV-C (compression).

Per 2-D tensor (``_svd.is_matrix``), r = min(m, n), tau_t = U_t diag(S_t) V_t^T, each task
keeps k = max(1, int(``fraction`` * r)) triplets (at most r; ``fraction`` None means 1/T):

- ``tsv_m`` (static): the tasks' U's and V's concatenated and orthogonalised (polar factor);
  merged task vector ``scaling`` * U_perp diag(S) V_perp^T (``scaling`` 1.0, the paper's
  alpha). Other tensors: ``scaling`` * mean_t tau_t.
- ``tsv_c`` (dynamic): task model t = theta_0 + U_t,k diag(S_t,k) V_t,k^T; other tensors
  kept whole. ``tsv_c_storage_bytes`` counts what is stored, exactly, from the shapes.

Triplets below the numerical rank (see ``_svd``) are dropped before the orthogonalisation.
Reported (ViT-B/32, 8 tasks): TSV-M 85.9; TSV-C keeps ~99% of the fine-tuned accuracy.
Details (kT > r, storage, the authors' code): docs/method-notes.md#tsv.
"""

from __future__ import annotations

import math
from typing import Annotated, Mapping, Sequence

import torch

from mergeflow.methods import Hp, register
from mergeflow.methods._svd import is_matrix, keep_count, low_rank, mean, orthogonalise, rank_of, significant, stacked_svd

REFERENCE = "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 (arXiv:2412.00081)"
Fraction = Annotated[float | None, Hp("share of each task vector's rank kept (default 1/T)", low=0.0, high=1.0)]


def per_task_rank(fraction: float | None, r: int, n_tasks: int) -> int:
    """k: the number of singular triplets kept per task of a rank-r matrix."""
    if fraction is None:
        return max(1, r // n_tasks)
    return keep_count(fraction, r)


def tsv_merge_matrix(taus: Sequence[torch.Tensor], fraction: float | None) -> torch.Tensor:
    """The TSV-M task vector of one 2-D tensor (before ``scaling``)."""
    n_tasks, shape = len(taus), taus[0].shape
    m, n = shape
    k = per_task_rank(fraction, rank_of(shape), n_tasks)
    u, s, vh = stacked_svd(taus)
    keep = significant(s, shape)[:, :k]  # (T, k)
    if not bool(keep.any()):
        return torch.zeros(shape, dtype=torch.float32, device=taus[0].device)
    s_k = s[:, :k] * keep
    u_cat = (u[:, :, :k] * keep[:, None, :]).transpose(0, 1).reshape(m, n_tasks * k)
    v_cat = (vh[:, :k, :] * keep[:, :, None]).reshape(n_tasks * k, n)
    return (orthogonalise(u_cat) * s_k.reshape(1, -1)) @ orthogonalise(v_cat)


@register(
    "tsv_m",
    reference=REFERENCE,
)
def tsv_m(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    fraction: Fraction = None,
    scaling: Annotated[float, Hp("coefficient on the merged task vector", low=0.0, high=10.0)] = 1.0,
) -> torch.Tensor:
    """Task Singular Vectors merge: each task's top singular triplets, decorrelated by orthogonal Procrustes."""
    if is_matrix(name, taus[0]):
        return tsv_merge_matrix(taus, fraction).mul_(scaling)
    return mean(taus).mul_(scaling)


def tsv_c_storage_bytes(
    shapes: Mapping[str, Sequence[int]], n_tasks: int, fraction: float | None = None, itemsize: int = 4
) -> int:
    """Exact bytes TSV-C stores besides the base for floating tensors of ``shapes``: per task,
    U_k (m x k), S_k (k) and V_k (k x n) of every 2-D tensor, every other tensor whole
    (``itemsize`` bytes a number, float32 by default)."""
    total = 0
    for shape in shapes.values():
        shape = tuple(shape)
        if len(shape) == 2:
            m, n = shape
            total += per_task_rank(fraction, min(m, n), n_tasks) * (m + n + 1)
        else:
            total += math.prod(shape)
    return total * n_tasks * itemsize


def _storage(
    n: int, n_tasks: int, itemsize: int, hp: dict | None = None, shapes: Mapping[str, Sequence[int]] | None = None
) -> int:
    """Exact (``tsv_c_storage_bytes``) when the floating tensors' shapes are given (the pipeline
    passes them); from the parameter count alone an estimate for the default fraction 1/T: a
    square r x r matrix keeps (r/T)(2r + 1) numbers per task, so T tasks together cost about 2n
    (1.25n for a 1:4 matrix), never more than T dense vectors."""
    fraction = (hp or {}).get("fraction")
    if shapes is not None:
        return tsv_c_storage_bytes(shapes, n_tasks, fraction)
    if fraction is not None:
        return min(int(2 * fraction * n_tasks * n), n * n_tasks) * itemsize
    return min(2 * n, n * n_tasks) * itemsize


@register(
    "tsv_c",
    kind="dynamic",
    reference=REFERENCE,
    storage=_storage,
)
def tsv_c(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], *, fraction: Fraction = None) -> list[torch.Tensor]:
    """Task Singular Vectors compression: each task model keeps its task vector's top singular triplets."""
    if not is_matrix(name, taus[0]):
        return [tau.clone() for tau in taus]
    k = per_task_rank(fraction, rank_of(taus[0].shape), len(taus))
    u, s, vh = stacked_svd(taus)
    return list(low_rank(u, s, vh, k).unbind(0))
