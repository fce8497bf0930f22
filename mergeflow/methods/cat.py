"""CAT Merging (Sun et al., ICML 2025, "CAT Merging: A Training-Free Approach for Resolving
Conflicts in Model Merging"): trim the conflict-prone components of each task vector, then
Task Arithmetic.

Knowledge conflict of task i on task k at one layer: how much tau_i moves task k's layer
outputs, against how much tau_i matters to task i itself (weighted by ``tradeoff``, the
paper's lambda), measured on ``exemplars`` train rows per task (their layer inputs,
``mergeflow.layer_stats``; the engine takes them as ``data=``). For each task k the top-``c``
conflict directions (linear weights: eigenvectors; norm scales and biases: dimensions) are
removed from every other task's vector; other tensors are untouched.
Merged: theta_0 + ``scaling`` * sum_t trimmed tau_t.

Defaults c = 4, ``tradeoff`` 0.25 (the best of a small grid on the built-in zoo), ``scaling``
0.3. Slow on a CPU for big models. Formulas, the grid, the cost: docs/method-notes.md#cat.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods import Hp, register

REFERENCE = "Sun et al., CAT Merging: A Training-Free Approach for Resolving Conflicts in Model Merging, ICML 2025"


def removal_basis(taus: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], k: int, c: int, lam: float) -> torch.Tensor:
    """B_k (out x c', c' <= c): top eigenvectors of M_k with positive eigenvalues.

    M_k = Z W Z^T with Z = [tau_i]_{i != k} (out x (T-1) in) and W = blockdiag(G_k - lambda G_i):
    where out is the larger side (an LM head: vocabulary x hidden), the eigenproblem is solved
    in Z's column space (Z = QR, eig of R W R^T), never as an out x out matrix."""
    others = [i for i in range(len(taus)) if i != k]
    out, inp = taus[0].shape
    if not others or c == 0:
        return taus[0].new_zeros(out, 0)
    blocks = [grams[k] - lam * grams[i] for i in others]
    if out <= len(others) * inp:
        m = sum(taus[i] @ b @ taus[i].T for i, b in zip(others, blocks))
        assert isinstance(m, torch.Tensor)  # others is not empty
        basis = None
    else:
        q, r = torch.linalg.qr(torch.cat([taus[i] for i in others], dim=1))  # q: out x (T-1) in
        w = torch.block_diag(*blocks)
        m = r @ w @ r.T
        basis = q
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m.double())  # ascending
    top = evals[-c:] > max(float(evals.abs().max()), 1e-300) * 1e-10
    vecs = evecs[:, -c:][:, top].to(taus[0].dtype)
    return vecs if basis is None else basis @ vecs


def removal_dims(taus: Sequence[torch.Tensor], s: Sequence[torch.Tensor], k: int, c: int, lam: float) -> torch.Tensor:
    """Indices of the top-``c`` dimensions with a positive conflict score for task k."""
    score = torch.zeros_like(taus[0])
    for i, tau in enumerate(taus):
        if i != k:
            score += tau.pow(2) * (s[k] - lam * s[i])
    if c == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    vals, idx = torch.topk(score, min(c, score.numel()))
    return idx[vals > 0]


def trim(name: str, taus: Sequence[torch.Tensor], stats: Sequence, c: int, lam: float) -> list[torch.Tensor]:
    """The trimmed task vectors of one tensor (unchanged when it has no statistics)."""
    if any(st is None for st in stats) or len({st.kind for st in stats}) != 1:
        return [t.clone() for t in taus]
    kind, T = stats[0].kind, len(taus)
    out = [t.clone() for t in taus]
    if kind == "linear":
        if taus[0].dim() != 2 or stats[0].value.shape[0] != taus[0].shape[1]:
            raise MergeflowError(
                f"cat: tensor {name}: input statistics of size {list(stats[0].value.shape)} "
                f"do not fit its shape {list(taus[0].shape)}"
            )
        grams = [st.value.to(taus[0].device, torch.float32) for st in stats]
        bases = [removal_basis(taus, grams, k, c, lam) for k in range(T)]
        for i in range(T):
            for k in range(T):
                if k != i and bases[k].shape[1]:
                    out[i] -= bases[k] @ (bases[k].T @ out[i])
        return out
    flat = [t.reshape(-1) for t in taus]
    s = [st.value.to(flat[0].device, torch.float32).reshape(-1) for st in stats]
    if s[0].numel() != flat[0].numel():
        raise MergeflowError(f"cat: tensor {name}: {s[0].numel()} input statistics for {flat[0].numel()} entries")
    for k in range(T):
        dims = removal_dims(flat, s, k, c, lam)
        for i in range(T):
            if i != k and dims.numel():
                out[i].view(-1)[dims] = 0.0
    return out


@register(
    "cat",
    reference=REFERENCE,
    data="layer_inputs",
)
def cat(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    c: Annotated[int, Hp("basis vectors (linear) or dimensions (norm, bias) removed per task and layer", low=0, high=4096)] = 4,
    tradeoff: Annotated[
        float, Hp("the paper's lambda: weight of the harm to a vector's own task", low=0.0, high=100.0, aliases=("lambda",))
    ] = 0.25,
    scaling: Annotated[float, Hp("Task Arithmetic coefficient on the trimmed task vectors", low=0.0, high=10.0)] = 0.3,
    exemplars: Annotated[int, Hp("train rows per task whose layer inputs measure the conflicts", low=1, high=100000)] = 32,
    ctx: list | None = None,
) -> torch.Tensor:
    """Project the conflict-prone components out of each task vector (exemplar layer inputs), then TA."""
    stats = [task_stats.get(name) for task_stats in (ctx or [])]
    trimmed = trim(name, taus, stats, c, tradeoff)
    total = trimmed[0].mul_(scaling)
    for t in trimmed[1:]:
        total.add_(t, alpha=scaling)
    return total
