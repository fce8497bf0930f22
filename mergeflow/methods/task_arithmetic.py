"""Task Arithmetic (Ilharco et al., ICLR 2023): theta_0 + scaling * sum_t tau_t."""
import torch

from mergeflow.methods import Param, register


@register(
    "task_arithmetic",
    params={"scaling": Param(0.3, "coefficient lambda on the summed task vectors", low=0.0, high=10.0)},
    reference="Ilharco et al., Editing models with task arithmetic, ICLR 2023",
    blockwise=True,
)
def task_arithmetic(name, base, taus, scaling):
    """Base plus scaling times the sum of task vectors."""
    total = taus[0] * scaling
    for tau in taus[1:]:
        total.add_(tau, alpha=scaling)
    return total
