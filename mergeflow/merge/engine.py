"""The engine's loop: every tensor of the base through a method, whole or block by block, to a sink."""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from mergeflow import kernels
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint_like import CheckpointReader
from mergeflow.merge.reading import PREFETCH_BYTES, ReadBuffers, _prefetched
from mergeflow.merge.sources import TaskVectors, is_floating
from mergeflow.methods import Method
from mergeflow.select import kth_largest

Progress = Callable[[int, int, str], None]
Sink = Callable[[str, int, list[torch.Tensor]], None]
BLOCK_CPU = 1 << 18  # elements per block of a block-wise method: temporaries stay in cache
BLOCK_CUDA = 1 << 26


def _float32(theta0: torch.Tensor, device: torch.device) -> torch.Tensor:
    b = theta0.to(device=device, dtype=torch.float32)
    return b.clone() if b.data_ptr() == theta0.data_ptr() else b


def run(
    method: Method,
    base: CheckpointReader,
    sources: Sequence[TaskVectors],
    hp: Mapping[str, Any],
    sink: Sink,
    device: torch.device = torch.device("cpu"),
    progress: Progress | None = None,
    data: Any = None,
) -> None:
    """Merge every tensor of the base (``hp`` overlays the method's defaults).

    ``sink(name, start, blocks)`` receives the merged weights as flat blocks: elements
    ``start ..`` of the flattened tensor, one block for a static method and one per task for
    a dynamic one; float32 (on ``device``) for floating tensors, the base's own tensor
    otherwise. Whole-tensor methods give one block per tensor; block-wise ones several.
    """
    if not sources:
        raise MergeflowError("merge: at least one fine-tuned model is needed")
    n_out = len(sources) if method.dynamic else 1
    names = base.names()
    hp = method.hyper(dict(hp))  # defaults for what is not given; checks what is
    kwargs: dict[str, Any] = dict(hp)
    ctx = None
    if method.needs is not None:
        if data is None:
            raise MergeflowError(
                f"method {method.name} needs {method.needs.replace('_', '-')} statistics of each task's "
                f"exemplars: run it in the pipeline, or pass data= to the engine"
            )
        if len(data) != len(sources):
            raise MergeflowError(f"method {method.name}: statistics given for {len(data)} tasks, {len(sources)} models")
        ctx = kwargs["ctx"] = data
    elif method.prepare is not None:
        floating = [n for n in names if is_floating(base, n)]

        def stream() -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
            for name, (theta0, raws) in _prefetched(base, sources, floating):
                b = _float32(theta0, device)
                yield name, b, [src.to_tau(r, b) for src, r in zip(sources, raws)]

        stream.names = tuple(floating)  # type: ignore[attr-defined]  # a prepare that needs only the names
        ctx = kwargs["ctx"] = method.prepare(stream, dict(hp))
    blockwise = method.is_blockwise(hp)
    if blockwise and method.kernel is not None:
        work = sum(math.prod(base.shape(n)) for n in names if is_floating(base, n)) * len(sources)
        kwargs["_fused"] = kernels.wanted(work, method.kernel_min)
    block = BLOCK_CUDA if device.type == "cuda" else BLOCK_CPU
    with contextlib.ExitStack() as stack:
        pool = _block_pool(device) if blockwise else None
        if pool is not None:
            stack.enter_context(pool)
        _run_tensors(method, base, sources, names, hp, kwargs, ctx, sink, device, progress, blockwise, block, n_out, pool)


def _run_tensors(method, base, sources, names, hp, kwargs, ctx, sink, device, progress, blockwise, block, n_out, pool) -> None:
    # Block-wise methods never hand the inputs' memory on (every block's result is a new
    # tensor), so their inputs can be read into reused buffers.
    buffers = ReadBuffers(2 * PREFETCH_BYTES) if blockwise and device.type == "cpu" else None
    for i, item in enumerate(_prefetched(base, sources, names, buffers)):
        name, (theta0, raws) = item
        del item
        if raws is None:
            sink(name, 0, [theta0.reshape(-1)] * n_out)
        elif blockwise:
            _run_blocks(method, name, theta0, raws, sources, kwargs, ctx, hp, sink, device, block, n_out, pool)
        else:
            b = _float32(theta0, device)
            taus = [src.to_tau(r, b) for src, r in zip(sources, raws)]
            raws = None
            deltas = _deltas(method, name, b, taus, kwargs, n_out)
            del taus
            sink(name, 0, [t.reshape(-1) for t in _add_base(deltas, b)])
            del deltas, b
        del theta0, raws  # before the next tensor is read
        if progress:
            progress(i + 1, len(names), name)


def _deltas(method: Method, name: str, b: torch.Tensor, taus: list[torch.Tensor], kwargs: dict, n_out: int) -> list[torch.Tensor]:
    result = method(name, b, taus, **kwargs)
    deltas = result if method.dynamic else [result]
    if len(deltas) != n_out:
        raise MergeflowError(f"method {method.name} returned {len(deltas)} tensors for {name}, expected {n_out}")
    return deltas


class TensorTaus:
    """One tensor's task vectors for ``tensor_stats``: ``taus(t)`` is task t's whole float32
    task vector (a fresh tensor); ``kth_abs`` and ``map`` as the method registry describes."""

    def __init__(
        self,
        theta0: torch.Tensor,
        raws: Sequence[torch.Tensor],
        sources: Sequence[TaskVectors],
        device: torch.device,
        pool: ThreadPoolExecutor | None,
    ):
        self.theta0, self.raws, self.sources, self.device, self.pool = theta0, raws, sources, device, pool
        self.numel = theta0.numel()
        self._b: torch.Tensor | None = None
        self._lock = threading.Lock()

    def _base32(self) -> torch.Tensor:
        with self._lock:
            if self._b is None:
                self._b = _float32(self.theta0, self.device)
            return self._b

    def __call__(self, t: int) -> torch.Tensor:
        b = self._base32()
        raw = self.raws[t]
        tau = self.sources[t].to_tau(raw, b)
        return tau.clone() if tau.data_ptr() == raw.data_ptr() else tau

    def kth_abs(self, t: int, k: int) -> float:
        """Exact k-th largest |tau_t| (1 <= k <= numel), fused on the CPU where it can be."""
        raw = self.raws[t]
        if _fusable(self.device, self.theta0, [raw]):
            return kernels.kth_abs_tau(
                kernels.as_array(self.theta0.reshape(-1)), kernels.as_array(raw.reshape(-1)), not self.sources[t].is_vector, k
            )
        return float(kth_largest(self(t).abs_(), k, checked=True))

    def map(self, fn: Callable[[int], Any], ts: Sequence[int] | range) -> list[Any]:
        """``[fn(t) for t in ts]``, on the engine's threads when it has them."""
        return list(self.pool.map(fn, ts)) if self.pool is not None else [fn(t) for t in ts]


def _fusable(device: torch.device, theta0: torch.Tensor, raws: Sequence[torch.Tensor]) -> bool:
    """Whether the fused CPU kernels read these inputs directly."""
    return (
        device.type == "cpu"
        and theta0.device.type == "cpu"
        and kernels.supported(theta0)
        and all(r.device.type == "cpu" and kernels.supported(r) and r.dtype == raws[0].dtype for r in raws)
        and kernels.available()
    )


def _run_blocks(method, name, theta0, raws, sources, kwargs, ctx, hp, sink, device, block, n_out, pool=None) -> None:
    """A block-wise method over one tensor: per-tensor stats first (from whole task vectors,
    or fused kernels reading the inputs), then slice by slice; only the inputs' own dtype is
    held whole.

    On the CPU the slices go to ``pool``'s threads: a method's fused kernel (``kernel``) where
    the inputs allow, else torch ops run single-threaded per worker (small elementwise ops
    then cost no OpenMP wake-ups, which dominate at cache-sized slices when idle threads
    sleep, as OMP_WAIT_POLICY=PASSIVE makes them)."""
    flat0 = theta0.reshape(-1)
    flats = [r.reshape(-1) for r in raws]
    kw = dict(kwargs)
    fused = kw.pop("_fused", False)
    if method.tensor_stats is not None:
        kw["stats"] = method.tensor_stats(name, TensorTaus(theta0, raws, sources, device, pool), len(sources), hp, ctx)
    n = flat0.numel()
    lock = threading.Lock()
    fused = fused and n_out == 1 and len({s.is_vector for s in sources}) == 1 and _fusable(device, theta0, raws)
    subtract = not sources[0].is_vector

    def one(start: int) -> None:
        stop = min(n, start + block)
        if fused:
            fts = torch.stack([f[start:stop] for f in flats])
            out = torch.empty(stop - start, dtype=torch.float32)
            method.kernel(kernels.as_array(flat0[start:stop]), kernels.as_array(fts), subtract, out.numpy(), hp, kw.get("stats"))
            merged = [out]
        else:
            b = _float32(flat0[start:stop], device)
            taus = [src.to_tau(f[start:stop], b) for src, f in zip(sources, flats)]
            deltas = _deltas(method, name, b, taus, kw, n_out)
            del taus
            merged = _add_base(deltas, b)
        with lock:
            sink(name, start, merged)

    starts = range(0, max(n, 1), block)
    if pool is None or len(starts) == 1:
        for start in starts:
            one(start)
    else:
        for _ in pool.map(one, starts):  # re-raises the first error
            pass


def _block_pool(device: torch.device) -> ThreadPoolExecutor | None:
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers < 2:
        return None
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="mergeflow-block", initializer=torch.set_num_threads, initargs=(1,)
    )


def _add_base(deltas: Sequence[torch.Tensor], b: torch.Tensor) -> list[torch.Tensor]:
    """theta_0 + delta for each delta, in place where a delta is a float32 tensor of its own."""
    out, seen = [], {b.data_ptr()}
    for d in deltas:
        own = d.dtype == torch.float32 and d.device == b.device and d.shape == b.shape and d.data_ptr() not in seen
        seen.add(d.data_ptr())
        out.append(d.add_(b) if own else d + b)
    return out
