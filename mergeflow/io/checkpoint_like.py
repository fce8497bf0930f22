"""What code reading a checkpoint asks of it, as Protocols (structural: no class names these).

``Checkpoint`` has all of it; the other checkpoint-like objects each have the part their users need:
``MemoryCheckpoint`` (a state dict: ``mergeflow.merge.sources``) reads tensors and knows their
layout, ``QuantView`` (``mergeflow.codecs.quant``) reads a task's dequantised tensors, and
``CheckpointView`` (``mergeflow.models.causal_download``) lays a writer's output out like a
renamed or restricted checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


class CheckpointLike(Protocol):
    """Where it is and its tensors' names: every checkpoint-like object (Checkpoint,
    MemoryCheckpoint, CheckpointView, QuantView)."""

    @property
    def path(self) -> Path: ...

    def names(self) -> list[str]: ...


class TensorReader(CheckpointLike, Protocol):
    """Tensors read by name: a task-vector source's stored tensors (Checkpoint, MemoryCheckpoint, QuantView)."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


@runtime_checkable
class TensorLayout(CheckpointLike, Protocol):
    """Shapes and dtypes by name, no data read (Checkpoint, MemoryCheckpoint, CheckpointView)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def tensor_dtype(self, name: str) -> torch.dtype: ...


class ShardedLayout(TensorLayout, Protocol):
    """A layout with the file (shard) of each tensor: what a CheckpointWriter mirrors (Checkpoint, CheckpointView)."""

    def file_of(self, name: str) -> Path: ...


class CheckpointReader(TensorReader, TensorLayout, Protocol):
    """Layout and tensors: the merge engine's base, a fine-tuned model (Checkpoint, MemoryCheckpoint)."""
