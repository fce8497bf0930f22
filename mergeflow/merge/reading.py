"""Reading the inputs tensor by tensor: the next tensor is read on a thread while one is merged,
into reused buffers where the consumer allows it."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Iterator, Sequence

import torch

from mergeflow.io.checkpoint import Checkpoint, check_finite
from mergeflow.io.checkpoint_like import CheckpointReader
from mergeflow.merge.sources import TaskVectors, is_floating

PREFETCH_BYTES = 256 << 20  # read the next tensor ahead only when its inputs are smaller than this
READERS = 2  # threads reading one tensor's inputs (page-cache copies run at ~6 GB/s per core)


class ReadBuffers:
    """Read buffers kept for reuse between tensors.

    Fresh memory costs a page fault per page when first written: measured here, reading into
    fresh buffers ran at ~2 GB/s against ~6 GB/s into reused ones, and big allocations
    (above malloc's mmap threshold) are fresh every time. Freed buffers wait here (at most
    ``keep`` bytes; the largest go first) for a tensor of similar size (at most 2x)."""

    def __init__(self, keep: int):
        self.keep, self._lock = keep, threading.Lock()
        self.free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self.free):  # sorted by size: the first that fits fits best
                if nbytes <= buf.numel() <= 2 * nbytes + 4096:
                    return self.free.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, bufs: Sequence[torch.Tensor]) -> None:
        with self._lock:
            self.free.extend(bufs)
            self.free.sort(key=torch.Tensor.numel)
            while self.free and sum(b.numel() for b in self.free) > self.keep:
                self.free.pop()


def _load(
    base: CheckpointReader,
    sources: Sequence[TaskVectors],
    name: str,
    buffers: ReadBuffers | None = None,
    readers: ThreadPoolExecutor | None = None,
):
    """(theta0, raws or None for a non-floating tensor, the pooled buffers they occupy); with
    ``buffers`` the inputs are read into reused memory, on the ``readers`` threads if given."""
    if not is_floating(base, name) or buffers is None:
        theta0 = base.get(name)
        if not theta0.is_floating_point():
            return theta0, None, []
        check_finite(name, theta0, base.path)
        raws = [src.fetch(name) for src in sources]
        _note_changes(theta0, raws, sources)
        return theta0, raws, []
    used: list[torch.Tensor] = []

    def alloc(nbytes: int) -> torch.Tensor:  # called from several reader threads at once
        buf = buffers.take(nbytes)
        used.append(buf)
        return buf

    def base_tensor() -> torch.Tensor:
        t = base.get(name, alloc) if isinstance(base, Checkpoint) else base.get(name)
        check_finite(name, t, base.path)
        return t

    jobs = [base_tensor] + [functools.partial(src.fetch, name, alloc) for src in sources]
    futures = [readers.submit(job) for job in jobs] if readers is not None else None
    try:
        theta0, *raws = [f.result() for f in futures] if futures else [job() for job in jobs]
    except BaseException:
        if futures:
            wait(futures)  # no reader may still be writing into a buffer that goes back
        buffers.give(used)
        raise
    _note_changes(theta0, raws, sources)
    return theta0, raws, used


def _note_changes(theta0: torch.Tensor, raws: Sequence[torch.Tensor], sources: Sequence[TaskVectors]) -> None:
    """Mark the sources whose task vector is nonzero on this tensor (checked until one is found:
    for a real fine-tune that is the first floating tensor, so it costs one comparison)."""
    for src, raw in zip(sources, raws):
        if not src.changed:
            src.changed = bool(raw.any()) if src.is_vector else not torch.equal(raw, theta0)


def _input_bytes(base: CheckpointReader, sources: Sequence[TaskVectors], name: str) -> int:
    return math.prod(base.shape(name)) * (1 + len(sources)) * base.tensor_dtype(name).itemsize


def _prefetched(
    base: CheckpointReader, sources: Sequence[TaskVectors], names: Sequence[str], buffers: ReadBuffers | None = None
) -> Iterator[tuple[str, Any]]:
    """(name, (theta0, raws)) in order; the next tensor is read on a thread while one is
    processed, unless its inputs are large (then two tensors' inputs would sit in memory).

    With ``buffers`` the inputs are read into reused memory, given back once the consumer
    asks for the next tensor: it must not keep references to them (or views) beyond that."""
    if not names:
        return
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-prefetch"))
        readers = (
            None
            if buffers is None
            else stack.enter_context(ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="mergeflow-read"))
        )
        load = functools.partial(_load, buffers=buffers, readers=readers)
        nxt: Future | None = pool.submit(load, base, sources, names[0])
        try:
            for i, name in enumerate(names):
                assert nxt is not None  # names[i]'s read was submitted before this step
                theta0, raws, used = nxt.result()
                nxt = None
                if i + 1 < len(names) and _input_bytes(base, sources, names[i + 1]) <= PREFETCH_BYTES:
                    nxt = pool.submit(load, base, sources, names[i + 1])
                yield name, (theta0, raws)
                del theta0, raws  # the consumer has dropped its references too: free before reading on
                if buffers is not None:
                    buffers.give(used)
                used = []
                if nxt is None and i + 1 < len(names):
                    nxt = pool.submit(load, base, sources, names[i + 1])
        finally:
            if nxt is not None and buffers is not None:
                try:
                    buffers.give(nxt.result()[2])
                except BaseException:
                    pass
