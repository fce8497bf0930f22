"""Where the engine's inputs come from: task-vector sources, in-memory checkpoints, the device."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, check_compatible, check_finite
from mergeflow.io.checkpoint_like import CheckpointReader, TensorLayout, TensorReader


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

    def __init__(self, base: CheckpointReader, ref: TensorReader, is_vector: bool):
        self.base, self.ref, self.is_vector = base, ref, is_vector
        self.changed = False  # set by the engine once a tensor of tau is seen to be nonzero
        if is_vector:
            floating = [n for n in base.names() if is_floating(base, n)]
            missing = [n for n in floating if n not in ref]
            if missing:
                raise MergeflowError(f"{ref.path}: tensor {missing[0]} of the base has no task vector")
        else:
            assert isinstance(ref, TensorLayout)  # a fine-tuned model, not a vector: it has shapes and dtypes
            check_compatible(base, ref)

    @classmethod
    def from_vector(cls, base: CheckpointReader, path: str | Path) -> "TaskVectors":
        return cls(base, Checkpoint(path), True)

    @classmethod
    def from_model(cls, base: CheckpointReader, path: str | Path | CheckpointReader) -> "TaskVectors":
        return cls(base, Checkpoint(path) if isinstance(path, (str, Path)) else path, False)

    def fetch(self, name: str, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """The stored tensor (a task vector, or the fine-tuned weights), checked finite."""
        t = self.ref.get(name, alloc) if alloc is not None and isinstance(self.ref, Checkpoint) else self.ref.get(name)
        check_finite(name, t, self.ref.path)
        return t

    def to_tau(self, raw: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """float32 tau on theta0's device, from what ``fetch`` returned."""
        t = raw.to(device=theta0.device, dtype=torch.float32, non_blocking=True)
        return t if self.is_vector else t.sub_(theta0) if t.data_ptr() != raw.data_ptr() else t - theta0

    def tau(self, name: str, device: torch.device) -> torch.Tensor:
        theta0 = self.base.get(name).to(device=device, dtype=torch.float32)
        return self.to_tau(self.fetch(name), theta0)


def is_floating(ckpt: TensorLayout, name: str) -> bool:
    return ckpt.tensor_dtype(name).is_floating_point


class MemoryCheckpoint:
    """A state dict behind the read side of the Checkpoint interface (for notebooks and tests)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: str = "<memory>"):
        self.path, self.config_path, self._sd = Path(path), None, dict(state_dict)

    def names(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, name: str) -> bool:
        return name in self._sd

    def get(self, name: str) -> torch.Tensor:
        if name not in self._sd:
            raise MergeflowError(f"{self.path}: tensor {name} not in checkpoint")
        return self._sd[name]

    def items(self, names=None):
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype
