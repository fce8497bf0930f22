"""Shared helpers of the SVD-based merges (TSV-M/TSV-C, Iso-C/Iso-CTS, CART).

Everything runs on the tensors' own device in float32 (the engine hands float32 tensors), so
CUDA works unchanged. The T task vectors of one layer are decomposed in one batched call,
``torch.linalg.svd(torch.stack(taus), full_matrices=False)``.

Numerical rank: singular triplets whose value is at most ``max(m, n) * eps * scale`` (``scale``
the largest singular value of the matrix, or a norm of the matrix it came from; the tolerance
``torch.linalg.matrix_rank`` uses) are treated as zero: their singular vectors are an arbitrary
completion of the SVD, differ between devices and libraries, and must neither enter an
orthogonalisation nor be given weight. Task vectors of real fine-tunes are numerically full
rank, where this changes nothing.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def is_matrix(name: str, t: torch.Tensor) -> bool:
    """Whether tensor ``name`` gets the SVD treatment: a 2-D floating tensor (others are averaged)."""
    return t.dim() == 2 and t.is_floating_point()


def rank_of(shape: Sequence[int]) -> int:
    """The full rank r = min(m, n) of a matrix of ``shape``."""
    return int(min(shape[-2], shape[-1]))


def keep_count(fraction: float, r: int) -> int:
    """k = max(1, int(fraction * r)), at most r (TSV's per-task number of triplets); robust
    to float noise (0.29 * 100 is 28.999999999999996)."""
    return max(1, min(r, int(fraction * r + 1e-9)))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of a matrix or a batch of matrices, in float32 on ``x``'s device."""
    return torch.linalg.svd(x.float(), full_matrices=False)


def stacked_svd(taus: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of every task vector of one layer in one batched call: U (T, m, r), S (T, r), Vh (T, r, n)."""
    return svd(torch.stack(list(taus)))


def tolerance(scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Singular values at most this are numerically zero (``scale`` a matrix's spectral or Frobenius norm)."""
    return scale * (max(shape[-2], shape[-1]) * torch.finfo(torch.float32).eps)


def significant(s: torch.Tensor, shape: Sequence[int], scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the singular values above the numerical-rank tolerance; ``s`` (..., r) sorted
    descending, ``scale`` (...) defaults to each matrix's largest singular value."""
    if scale is None:
        scale = s[..., 0]
    return s > tolerance(scale, shape).unsqueeze(-1)


def orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """The polar (orthogonal Procrustes) factor P Q^T of M = P diag(d) Q^T: the matrix with
    orthonormal columns (or rows, if M is wide) nearest to M in Frobenius norm."""
    p, _, qh = svd(m)
    return p @ qh


def low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> torch.Tensor:
    """U_k diag(S_k) V_k^T, batched over leading dimensions (the best rank-k approximation)."""
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


def mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the task vectors (what non-matrix tensors get)."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return total.div_(len(taus))


def ceil_count(ratio: float, r: int) -> int:
    """ceil(ratio * r), robust to float noise (0.08 * 100 is 8.000000000000002), within [0, r]."""
    return max(0, min(r, math.ceil(ratio * r - 1e-9)))
