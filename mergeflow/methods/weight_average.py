"""Weight averaging: the mean of the fine-tuned weights, theta_0 + mean_t tau_t."""

from __future__ import annotations

from typing import Sequence

import torch


from mergeflow import kernels
from mergeflow.methods import register
from mergeflow.methods.task_arithmetic import LINEAR_KERNEL_MIN


def _kernel(base, fts, subtract, out, hp, stats):
    kernels.linear_block(base, fts, subtract, [1.0] * fts.shape[0], out, divisor=fts.shape[0])


@register(
    "weight_average",
    reference="Wortsman et al., Model soups, ICML 2022",
    blockwise=True,
    kernel=_kernel,
    kernel_min=LINEAR_KERNEL_MIN,
)
def weight_average(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the fine-tuned models."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    return total.div_(len(taus))
