"""T-Switch (Qi et al., CVPR 2025, "Less is More: Efficient Model Merging with Binary Task Switch").

Per task and per tensor with at least one dimension, the task vector becomes three switches:
an activation switch (keep the int(n_pos*(1-drop)) largest positive and int(n_neg*(1-drop))
most negative entries, ties at the threshold kept; a sign whose keep count is 0 is left
unpruned, all its entries kept), a polarity switch B = sign of the kept
entries, and one norm-preserving scale s = ||tau_kept||_2 / ||B||_2. The task model is
theta_0 + s * B. 0-dim tensors stay dense; all-zero task-vector tensors are skipped.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Any, Iterable, Iterator, Mapping, Sequence

import torch

from mergeflow.codecs.switch import Switch, SwitchTensor
from mergeflow.errors import MergeflowError
from mergeflow.methods import EvalJob, Hp, MergeJob, Method, register
from mergeflow.select import kth_largest

# [0, 1): at 1 every sign's keep count is 0, and a sign too few to prune is kept whole, so drop 1
# would keep everything; it is refused instead.
NAME = "tswitch"
REFERENCE = "Qi et al., Less is More: Efficient Model Merging with Binary Task Switch, CVPR 2025"
Drop = Annotated[
    float, Hp("share of each sign's non-zero entries dropped (0.6 ViT, 0.7 RoBERTa, 0.4 LoRA)", low=0.0, high=1.0, high_open=True)
]


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
    scale = float(tau[kept].double().norm() / (n_kept**0.5)) if n_kept else 0.0
    # float32 like the stored scale, so every consumer sees the same number
    return ternary, float(torch.tensor(scale, dtype=torch.float32))


def compress(
    taus: Iterable[tuple[str, torch.Tensor]],
    drop: float,
    keep_dense: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Switch:
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
    meta = {"method": NAME, "drop": repr(float(drop)), **dict(metadata or {})}
    return Switch(tensors=tensors, dense=dense, skipped=skipped, metadata=meta)


def delta(switch: Switch, name: str, like: torch.Tensor) -> torch.Tensor:
    """The task's update of one tensor, s * B (dense tensors as stored, skipped ones zero)."""
    if name in switch.tensors:
        return switch.delta(name).to(like.device)
    if name in switch.dense:
        return switch.dense[name].to(device=like.device, dtype=torch.float32)
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def write_switches(method: Method, job: MergeJob) -> tuple[int, dict]:
    """The pipeline's T-Switch / Auto-Switch: the compress stage's switch files are the compact
    form (the task model is built on load); Auto-Switch keeps its query set beside them."""
    job.dst.mkdir()
    files = [job.switch(t) for t in job.tasks] + ([job.queries()] if method.kind == "routed" else [])
    for f in files:
        shutil.copyfile(f, job.dst / f.name)
    return sum((job.dst / f.name).stat().st_size for f in files), {"store": "switches", **job.hp}


def switch_models(job: EvalJob) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Each task's model theta_0 + s_t B_t, built from its stored switch."""
    from mergeflow.codecs.switch import SWITCH_SUFFIX, load_switch

    for task in job.tasks:
        path = job.folder / f"{task}{SWITCH_SUFFIX}"
        yield task, apply_switch(job.base, load_switch(path), source=str(path))


def write_compact(base, sources, hp: dict, out, echo) -> None:
    """``mergeflow merge --set store=switches``: one switch file per model, no merged checkpoint."""
    from mergeflow.codecs.switch import save_switch
    from mergeflow.io.atomic import atomic_dir
    from mergeflow.vectors import iter_task_vector

    with atomic_dir(out) as tmp:
        for i, src in enumerate(sources):
            sw = compress(iter_task_vector(base, src.ref), hp["drop"], metadata={"model": str(src.ref.path)})
            st = save_switch(tmp / f"task_{i}.switch.safetensors", sw)
            echo(f"task_{i}: {st.bits_per_param:.3f} bits/param, {st.file_bytes:,} bytes")


def _switches(taus: Sequence[torch.Tensor], drop: float) -> list[torch.Tensor]:
    out = []
    for tau in taus:
        if tau.dim() == 0 or not bool(tau.any()):
            out.append(tau.float())
        else:
            ternary, scale = ternarize(tau, drop)
            out.append(ternary.float() * scale)
    return out


@register(
    NAME,
    kind="dynamic",
    reference=REFERENCE,
    set_by={"drop": "compress.drop"},
    write=write_switches,
    models=switch_models,
    compact=write_compact,
    codec=compress,
)
def tswitch(name: str, base: torch.Tensor, taus: Sequence[torch.Tensor], *, drop: Drop = 0.6) -> list[torch.Tensor]:
    """Per-task binary switch theta_0 + s_t * B_t (task identity known)."""
    return _switches(taus, drop)


def evaluate_routed(job: EvalJob) -> dict[str, dict[str, Any]]:
    """Auto-Switch on shuffled mixed-task test batches: one row per routing mode."""
    from mergeflow.autoswitch import evaluate_autoswitch

    modes = evaluate_autoswitch(job.folder, job.tasks, job.meta, job.family, job.base, job.data, job.seed)
    name = job.meta["method"]
    return {
        f"{name}_{mode}": {"scores": scores, "extra": {"routing_acc": routing, "method": name, "mode": mode, "dynamic": True}}
        for mode, (scores, routing) in modes.items()
    }


@register(
    "autoswitch",
    kind="routed",
    reference=f"{REFERENCE} (Auto-Switch)",
    set_by={"drop": "compress.drop", "queries": "compress.queries"},
    write=write_switches,
    evaluate=evaluate_routed,
)
def autoswitch(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    drop: Drop = 0.6,
    k: Annotated[int, Hp("nearest queries that vote for the tasks' switches (10 ViT, 5 RoBERTa)", low=1)] = 10,
    batch_size: Annotated[int, Hp("inputs per shuffled mixed-task batch at evaluation", low=1)] = 128,
    queries: Annotated[int, Hp("query samples per task (train split, base-model embeddings)", low=1)] = 100,
) -> list[torch.Tensor]:
    """T-Switch's switches, routed per input by k-nearest-neighbour retrieval (task identity unknown).
    Per tensor the switches are T-Switch's; routing needs the query set, which the pipeline
    builds (compress stage) and ``mergeflow.runtime`` serves."""
    return _switches(taus, drop)


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
            raise MergeflowError(
                f"{source}: tensor {name} has shape {list(switch.tensors[name].ternary.shape)}, base has {list(theta.shape)}"
            )
        out[name] = (theta.float() + delta(switch, name, theta)).to(theta.dtype) if theta.is_floating_point() else theta
    return out
