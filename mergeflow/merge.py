"""The merge engine: streams the base and the task vectors tensor by tensor through a method."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, check_compatible, check_finite, write_checkpoint
from mergeflow.methods import Method

Progress = Callable[[int, int, str], None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeflowError("device: cuda requested but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise MergeflowError(f"device: {device!r} is not one of cpu, cuda, auto")
    return torch.device(device)


class TaskVectors:
    """Where tau_t comes from: a stored task-vector file, or a fine-tuned model minus the base."""

    def __init__(self, base: Checkpoint, ref: Checkpoint, is_vector: bool):
        self.base, self.ref, self.is_vector = base, ref, is_vector
        if not is_vector:
            check_compatible(base, ref)

    @classmethod
    def from_vector(cls, base: Checkpoint, path: str | Path) -> "TaskVectors":
        return cls(base, Checkpoint(path), True)

    @classmethod
    def from_model(cls, base: Checkpoint, path: str | Path) -> "TaskVectors":
        return cls(base, Checkpoint(path), False)

    def tau(self, name: str, device: torch.device) -> torch.Tensor:
        if self.is_vector:
            if name not in self.ref:
                raise MergeflowError(f"{self.ref.path}: tensor {name} of the base has no task vector")
            return self.ref.get(name).to(device=device, dtype=torch.float32)
        theta = self.ref.get(name)
        check_finite(name, theta, self.ref.path)
        return theta.to(device=device, dtype=torch.float32) - self.base.get(name).to(device=device, dtype=torch.float32)


def merge(
    method: Method,
    base: Checkpoint,
    sources: Sequence[TaskVectors],
    hp: dict[str, Any],
    device: torch.device = torch.device("cpu"),
    progress: Progress | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run ``method`` over every tensor of the base; returns one state dict (static) or one per task.

    Tensors come back on the CPU in float32; non-floating tensors are copied from the base.
    """
    if not sources:
        raise MergeflowError("merge: at least one fine-tuned model is needed")
    n_out = len(sources) if method.dynamic else 1
    outs: list[dict[str, torch.Tensor]] = [{} for _ in range(n_out)]
    names = base.names()
    for i, name in enumerate(names):
        theta0 = base.get(name)
        if not theta0.is_floating_point():
            for out in outs:
                out[name] = theta0
            continue
        check_finite(name, theta0, base.path)
        b = theta0.to(device=device, dtype=torch.float32)
        taus = [src.tau(name, device) for src in sources]
        result = method(name, b, taus, **hp)
        deltas = result if method.dynamic else [result]
        for out, d in zip(outs, deltas):
            out[name] = (b + d).cpu()
        if progress:
            progress(i + 1, len(names), name)
    return outs


def write_merged(outs: list[dict[str, torch.Tensor]], out_dir: str | Path, base: Checkpoint, dynamic: bool, dtype: torch.dtype | None = None) -> list[Path]:
    """Static: ``out_dir`` is the checkpoint. Dynamic: ``out_dir/task_<i>/`` per task."""
    out_dir = Path(out_dir)
    if not dynamic:
        return [write_checkpoint(out_dir, outs[0], like=base, dtype=dtype)]
    return [write_checkpoint(out_dir / f"task_{i}", sd, like=base, dtype=dtype) for i, sd in enumerate(outs)]
