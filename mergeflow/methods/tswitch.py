"""T-Switch (Qi et al., CVPR 2025, "Less is More: Efficient Model Merging with Binary Task Switch").

Per task and per tensor with at least one dimension, the task vector becomes three switches:
an activation switch (keep the int(n_pos*(1-drop)) largest positive and int(n_neg*(1-drop))
most negative entries, ties at the threshold kept; a sign whose keep count is 0 is left
unpruned, all its entries kept), a polarity switch B = sign of the kept
entries, and one norm-preserving scale s = ||tau_kept||_2 / ||B||_2. The task model is
theta_0 + s * B. 0-dim tensors stay dense; all-zero task-vector tensors are skipped.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from mergeflow.codecs.switch import Switch, SwitchTensor
from mergeflow.errors import MergeflowError
from mergeflow.methods import Param, register
from mergeflow.select import kth_largest

# [0, 1): at 1 every sign's keep count is 0, and a sign too few to prune is kept whole, so drop 1
# would keep everything; it is refused instead.
DROP = Param(0.6, "share of each sign's non-zero entries dropped (0.6 ViT, 0.7 RoBERTa, 0.4 LoRA)", low=0.0, high=1.0,
             high_open=True)


def ternarize(tau: torch.Tensor, drop: float) -> tuple[torch.Tensor, float]:
    """The activation and polarity switches and the scaling knob of one tensor: (B as int8, s)."""
    tau = tau.float()
    ternary = torch.zeros(tau.shape, dtype=torch.int8, device=tau.device)
    for sign in (1, -1):
        values = tau * sign
        positive = values > 0
        candidates = values[positive]
        keep = int(candidates.numel() * (1 - drop))
        if keep <= 0:  # too few of this sign to prune (the authors' guard): all of them are kept
            ternary[positive] = sign
            continue
        threshold = kth_largest(candidates, keep)
        ternary[positive & (values >= threshold)] = sign
    kept = ternary != 0
    n_kept = int(kept.sum())
    scale = float(tau[kept].double().norm() / (n_kept ** 0.5)) if n_kept else 0.0
    # float32 like the stored scale, so every consumer sees the same number
    return ternary, float(torch.tensor(scale, dtype=torch.float32))


def compress(taus: Iterable[tuple[str, torch.Tensor]], drop: float, keep_dense: Iterable[str] = (), metadata: Mapping[str, str] | None = None) -> Switch:
    """Build the switch of one task from its task-vector tensors."""
    keep_dense = set(keep_dense)
    tensors, dense, skipped = {}, {}, []
    for name, tau in taus:
        if tau.dim() == 0 or name in keep_dense:
            dense[name] = tau.float().cpu()
        elif not bool(tau.any()):
            skipped.append(name)
        else:
            ternary, scale = ternarize(tau, drop)
            tensors[name] = SwitchTensor(ternary.cpu(), scale)
    meta = {"method": "tswitch", "drop": repr(float(drop)), **dict(metadata or {})}
    return Switch(tensors=tensors, dense=dense, skipped=skipped, metadata=meta)


def delta(switch: Switch, name: str, like: torch.Tensor) -> torch.Tensor:
    """The task's update of one tensor, s * B (dense tensors as stored, skipped ones zero)."""
    if name in switch.tensors:
        return switch.delta(name).to(like.device)
    if name in switch.dense:
        return switch.dense[name].to(device=like.device, dtype=torch.float32)
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


@register(
    "tswitch",
    dynamic=True,
    params={"drop": DROP},
    reference="Qi et al., Less is More: Efficient Model Merging with Binary Task Switch, CVPR 2025",
)
def tswitch(name, base, taus, drop):
    """Per-task binary switch theta_0 + s_t * B_t (task identity known)."""
    out = []
    for tau in taus:
        if tau.dim() == 0 or not bool(tau.any()):
            out.append(tau.float())
        else:
            ternary, scale = ternarize(tau, drop)
            out.append(ternary.float() * scale)
    return out


@register(
    "autoswitch",
    dynamic=True,
    params={"drop": DROP,
            "k": Param(10, "nearest queries that vote for the tasks' switches (10 ViT, 5 RoBERTa)", low=1),
            "batch_size": Param(128, "inputs per shuffled mixed-task batch at evaluation", low=1)},
    reference="Qi et al., Less is More: Efficient Model Merging with Binary Task Switch, CVPR 2025 (Auto-Switch)",
)
def autoswitch(name, base, taus, drop, k, batch_size):
    """T-Switch's switches routed per input by k-nearest-neighbour retrieval (task identity unknown).

    Routing needs a query set of embedded samples, so it runs in the pipeline (or through
    ``mergeflow.runtime``); per tensor the switches are T-Switch's."""
    raise MergeflowError("autoswitch routes each input at inference: run it in the pipeline (merge.methods) "
                         "or serve it with mergeflow.runtime; `mergeflow merge --method tswitch --set store=switches` writes its switches")


def apply_switch(base, switch: Switch, source: str = "switch") -> dict[str, torch.Tensor]:
    """The task model theta_0 + s * B as a state dict in the base's dtypes.

    ``base`` is a Checkpoint or a state dict (anything with ``items()``)."""
    base_items = list(base.items())
    names = {n for n, _ in base_items}
    for name in [*switch.tensors, *switch.dense, *switch.skipped]:
        if name not in names:
            raise MergeflowError(f"{source}: tensor {name} is not in the base {getattr(base, 'path', '')}".rstrip())
    out = {}
    for name, theta in base_items:
        if name in switch.tensors and tuple(switch.tensors[name].ternary.shape) != tuple(theta.shape):
            raise MergeflowError(f"{source}: tensor {name} has shape {list(switch.tensors[name].ternary.shape)}, base has {list(theta.shape)}")
        out[name] = (theta.float() + delta(switch, name, theta)).to(theta.dtype) if theta.is_floating_point() else theta
    return out
