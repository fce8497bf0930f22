"""The merge engine: streams the base and the task vectors tensor by tensor through a method.

One tensor at a time: the base's tensor and every model's tensor are read (the next
tensor's reads overlap the current one's arithmetic on a background thread), turned into
float32 task vectors on the working device, handed to the method, and the result goes
straight to its sink: a streaming checkpoint writer (``merge_to_disk``) or a dict
(``merge``). Peak memory is about (models + method temporaries) x the largest tensor, never
the model size. A method with a ``prepare`` step (a model-wide threshold, EMR's rescalers)
gets extra read-only passes over the inputs before the writing pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mergeflow.io.checkpoint import Checkpoint
from mergeflow.io.checkpoint_like import CheckpointReader
from mergeflow.io.writer import CheckpointWriter
from mergeflow.merge.engine import BLOCK_CPU, BLOCK_CUDA, Progress, Sink, TensorTaus, run
from mergeflow.merge.reading import PREFETCH_BYTES, READERS, ReadBuffers
from mergeflow.merge.sources import MemoryCheckpoint, TaskVectors, is_floating, resolve_device
from mergeflow.methods import Method

__all__ = [
    "BLOCK_CPU",
    "BLOCK_CUDA",
    "PREFETCH_BYTES",
    "READERS",
    "MemoryCheckpoint",
    "Progress",
    "ReadBuffers",
    "Sink",
    "TaskVectors",
    "TensorTaus",
    "is_floating",
    "merge",
    "merge_state_dicts",
    "merge_to_disk",
    "resolve_device",
    "run",
]


def merge(
    method: Method,
    base: CheckpointReader,
    sources: Sequence[TaskVectors],
    hp: Mapping[str, Any],
    device: torch.device = torch.device("cpu"),
    progress: Progress | None = None,
    data: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """``run`` into memory: one state dict (static) or one per task (dynamic), on the CPU."""
    outs: list[dict[str, torch.Tensor]] = [{} for _ in range(len(sources) if method.dynamic else 1)]

    def sink(name: str, start: int, blocks: list[torch.Tensor]) -> None:
        shape = tuple(base.shape(name))
        for out, blk in zip(outs, blocks):
            if name not in out:
                if start == 0 and blk.numel() == math.prod(shape):
                    out[name] = blk.cpu().reshape(shape)
                    continue
                out[name] = torch.empty(shape, dtype=blk.dtype)
            out[name].view(-1)[start : start + blk.numel()] = blk.cpu()

    run(method, base, sources, hp, sink, device, progress, data)
    return outs


def merge_to_disk(
    method: Method,
    base: Checkpoint,
    sources: Sequence[TaskVectors],
    hp: Mapping[str, Any],
    out_dir: str | Path,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    metadata: Mapping[str, str] | None = None,
    data: Any = None,
    extra: Callable[[Path], None] | None = None,
) -> list[Path]:
    """``run`` into checkpoints laid out like the base, written as the tensors are made.

    Static: ``out_dir`` is the checkpoint. Dynamic: ``out_dir/task_<i>/`` for the i-th source.
    Floating tensors are written in ``dtype`` (default: the base tensor's dtype). ``extra(folder)``
    adds files (per-task heads) to the output folder before it is renamed into place. Atomic: on
    any error no ``out_dir`` is left behind (an existing one is kept unchanged).
    """
    from mergeflow.io.atomic import atomic_dir

    out_dir = Path(out_dir)
    meta = {"mergeflow_method": method.name, **dict(metadata or {})}
    if not method.dynamic:
        with CheckpointWriter(out_dir, like=base, dtype=dtype, metadata=meta, on_finish=extra) as w:
            run(method, base, sources, hp, lambda name, start, ts: w.write_block(name, start, ts[0]), device, progress, data)
        return [out_dir]
    with atomic_dir(out_dir) as tmp:
        writers = [
            CheckpointWriter(tmp / f"task_{i}", like=base, dtype=dtype, metadata={**meta, "task_index": str(i)})
            for i in range(len(sources))
        ]
        entered: list[CheckpointWriter] = []
        try:
            for w in writers:
                entered.append(w.__enter__())

            def sink(name: str, start: int, blocks: list[torch.Tensor]) -> None:
                for w, t in zip(writers, blocks):
                    w.write_block(name, start, t)

            run(method, base, sources, hp, sink, device, progress, data)
        except BaseException as exc:
            for w in reversed(entered):
                w.__exit__(type(exc), exc, exc.__traceback__)
            raise
        for w in entered:
            w.__exit__(None, None, None)
        if extra is not None:
            extra(tmp)
    return [out_dir / f"task_{i}" for i in range(len(sources))]


def merge_state_dicts(
    method: Method,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    hp: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    data: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Merge in-memory state dicts: ``hp`` overlays the method's defaults (checked).

    Returns one merged state dict (static) or one per model (dynamic); floating tensors in float32.
    """
    b = MemoryCheckpoint(base, "<base>")
    sources = [TaskVectors.from_model(b, MemoryCheckpoint(m, f"<model {i}>")) for i, m in enumerate(models)]
    return merge(method, b, sources, hp or {}, torch.device(device) if isinstance(device, str) else device, data=data)
