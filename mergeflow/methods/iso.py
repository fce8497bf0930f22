"""Isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind"): Iso-C and Iso-CTS.

Per 2-D tensor (``_svd.is_matrix``), r = min(m, n), Delta = sum_t tau_t = U diag(sigma) V^T:

- ``iso_c``: ``scaling`` * sigma_bar U V^T with sigma_bar = (1/r) sum_{i<=r} sigma_i (every
  singular value replaced by their mean).
- ``iso_cts``: a common subspace of Delta (about ``common_fraction`` of the rank) plus each
  task's top directions orthogonal to it, orthogonalised as TSV-M, with the isotropic value.
- Other tensors: ``scaling`` * mean_t tau_t.

``scaling`` is alpha in theta_0 + alpha Delta_Iso, default 1.0 (FusionBench's default);
``common_fraction`` 0.8 (the authors' config). Directions whose singular value is numerically
zero (see ``_svd``) get weight 0.
The rank split, the defaults' sources, the authors' code: docs/method-notes.md#iso.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch

from mergeflow.methods import Hp, register
from mergeflow.methods._svd import is_matrix, mean, orthogonalise, rank_of, significant, svd

REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
    "ICML 2025 (arXiv:2502.04959)"
)
Scaling = Annotated[float, Hp("alpha: coefficient on the merged task vector", low=0.0, high=10.0)]


def _sum(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return total


def iso_c_matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """sigma_bar U V^T of Delta = sum_t tau_t (before ``scaling``)."""
    total = _sum(taus)
    u, s, vh = svd(total)
    return (u * (s.mean() * significant(s, total.shape))) @ vh


def split(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k common directions, s directions per task) with k + s T = r, as the authors compute them."""
    k = int(r * common_fraction)
    s = round((r - k) / n_tasks)
    if s * n_tasks > r:  # only when k < T/2: give each task what fits
        s = r // n_tasks
    return r - s * n_tasks, s


def iso_cts_matrix(taus: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """sigma_bar U_perp V_perp^T over the common and task-specific subspaces (before ``scaling``)."""
    shape = taus[0].shape
    r = rank_of(shape)
    k, s_per = split(r, len(taus), common_fraction)
    u, s, vh = svd(_sum(taus))
    u_c, s_c, v_c = u[:, :k], s[:k], vh[:k]
    keep_c = significant(s, shape)[:k]
    us, ss, vs, keeps = [u_c], [s_c], [v_c], [keep_c]
    if s_per > 0:
        stacked = torch.stack(list(taus))
        specific = stacked - u_c @ (u_c.T @ stacked)  # (I - U_k U_k^T) tau_t, batched
        ut, st, vht = svd(specific)
        norms = torch.linalg.matrix_norm(stacked)  # relative to tau_t: its projection may be all noise
        keep_t = significant(st, shape, norms)[:, :s_per]
        us.append(ut[:, :, :s_per].transpose(0, 1).reshape(shape[0], -1))
        vs.append(vht[:, :s_per, :].reshape(-1, shape[1]))
        ss.append(st[:, :s_per].reshape(-1))
        keeps.append(keep_t.reshape(-1))
    keep = torch.cat(keeps)
    if not bool(keep.any()):
        return torch.zeros(shape, dtype=torch.float32, device=taus[0].device)
    sigma_bar = torch.cat(ss).mean()  # over all r = k + s T values, as the authors
    u_star = torch.cat(us, dim=1) * keep
    v_star = torch.cat(vs, dim=0) * keep[:, None]
    return (orthogonalise(u_star) * (sigma_bar * keep)) @ orthogonalise(v_star)


@register("iso_c", reference=REFERENCE)
def iso_c(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], *, scaling: Scaling = 1.0) -> torch.Tensor:
    """Isotropic merge in the common subspace: the sum of task vectors with a flat singular spectrum."""
    if is_matrix(name, taus[0]):
        return iso_c_matrix(taus).mul_(scaling)
    return mean(taus).mul_(scaling)


@register(
    "iso_cts",
    reference=REFERENCE,
)
def iso_cts(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    common_fraction: Annotated[float, Hp("share of the rank given to the common subspace of the sum", low=0.0, high=1.0)] = 0.8,
    scaling: Scaling = 1.0,
) -> torch.Tensor:
    """Isotropic merge in the common and task-specific subspaces, flat singular spectrum."""
    if is_matrix(name, taus[0]):
        return iso_cts_matrix(taus, common_fraction).mul_(scaling)
    return mean(taus).mul_(scaling)
