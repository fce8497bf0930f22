"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop and rescale.

Each entry of each tau_t is dropped with probability ``drop`` and the survivors are rescaled
by 1/(1-drop); then Task Arithmetic or TIES (``merge``). With ``merge: ties`` the random drop
stands in for TIES' trim unless ``density`` < 1 asks for both (mergekit's ``dare_ties`` is
the default ``density: 1.0``). Randomness is seeded per (``seed``, tensor name, task index)
and drawn on the CPU, so a merge is the same on any device, in any tensor order.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, Sequence

import torch

from mergeflow.methods import Hp, register
from mergeflow.methods.ties import disjoint_mean, trim

Seed = Annotated[int, Hp("random seed of the drop masks (a merge is reproducible from it)", low=0)]
Drop = Annotated[float, Hp("probability of dropping each task-vector entry", low=0.0, high=0.999)]
Merge = Annotated[Literal["task_arithmetic", "ties"], Hp("what merges the rescaled vectors", aliases=("base",))]
Scaling = Annotated[float, Hp("coefficient on the merged task vector (Task Arithmetic 0.3, TIES about 1)", low=0.0, high=10.0)]
Density = Annotated[
    float, Hp("with merge ties: TIES trim after the drop (1.0: none, as mergekit's dare_ties)", low=0.0, high=1.0)
]


def generator(seed: int, name: str, index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def drop_and_rescale(tau: torch.Tensor, drop: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability 1-drop (Bernoulli, seeded), rescaled by 1/(1-drop)."""
    if drop <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=gen) >= drop
    return tau * keep.to(tau.device) / (1.0 - drop)


@register(
    "dare",
    reference="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024",
)
def dare(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    drop: Drop = 0.9,
    merge: Merge = "task_arithmetic",
    scaling: Scaling = 0.3,
    density: Density = 1.0,
    seed: Seed = 0,
) -> torch.Tensor:
    """Drop each entry with probability drop, rescale the rest, then Task Arithmetic or TIES."""
    rescaled = [drop_and_rescale(t, drop, generator(seed, name, i)) for i, t in enumerate(taus)]
    if merge == "ties":
        merged = disjoint_mean([trim(t, density) for t in rescaled])
    else:
        merged = torch.stack(rescaled).sum(0)
    return merged * scaling
