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

import functools
import math
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from mergeflow import kernels
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, check_compatible, check_finite
from mergeflow.io.writer import CheckpointWriter
from mergeflow.methods import Method
from mergeflow.select import kth_largest

Progress = Callable[[int, int, str], None]
Sink = Callable[[str, int, list[torch.Tensor]], None]


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
        self.changed = False  # set by the engine once a tensor of tau is seen to be nonzero
        if is_vector:
            floating = [n for n in base.names() if _is_floating(base, n)]
            missing = [n for n in floating if n not in ref]
            if missing:
                raise MergeflowError(f"{ref.path}: tensor {missing[0]} of the base has no task vector")
        else:
            check_compatible(base, ref)

    @classmethod
    def from_vector(cls, base: Checkpoint, path: str | Path) -> "TaskVectors":
        return cls(base, Checkpoint(path), True)

    @classmethod
    def from_model(cls, base: Checkpoint, path: str | Path | Checkpoint) -> "TaskVectors":
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


def _is_floating(ckpt: Checkpoint, name: str) -> bool:
    return ckpt.tensor_dtype(name).is_floating_point


BLOCK_CPU = 1 << 18  # elements per block of a block-wise method: temporaries stay in cache
BLOCK_CUDA = 1 << 26
PREFETCH_BYTES = 256 << 20  # read the next tensor ahead only when its inputs are smaller than this
READERS = 2  # threads reading one tensor's inputs (page-cache copies run at ~6 GB/s per core)


class ReadBuffers:
    """Read buffers kept for reuse between tensors.

    Fresh memory costs a page fault per page when first written: measured here, reading into
    fresh buffers ran at ~2 GB/s against ~6 GB/s into reused ones, and big allocations
    (above malloc's mmap threshold) are fresh every time. Freed buffers wait here (at most
    ``keep`` bytes; the largest go first) for a tensor of similar size (at most 2x)."""

    def __init__(self, keep: int):
        self.keep, self.free, self._lock = keep, [], threading.Lock()

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


def _load(base: Checkpoint, sources: Sequence[TaskVectors], name: str, buffers: ReadBuffers | None = None,
          readers: ThreadPoolExecutor | None = None):
    """(theta0, raws or None for a non-floating tensor, the pooled buffers they occupy); with
    ``buffers`` the inputs are read into reused memory, on the ``readers`` threads if given."""
    if not _is_floating(base, name) or buffers is None:
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


def _input_bytes(base: Checkpoint, sources: Sequence[TaskVectors], name: str) -> int:
    return math.prod(base.shape(name)) * (1 + len(sources)) * base.tensor_dtype(name).itemsize


def _prefetched(base: Checkpoint, sources: Sequence[TaskVectors], names: Sequence[str],
                buffers: ReadBuffers | None = None) -> Iterator[tuple[str, Any]]:
    """(name, (theta0, raws)) in order; the next tensor is read on a thread while one is
    processed, unless its inputs are large (then two tensors' inputs would sit in memory).

    With ``buffers`` the inputs are read into reused memory, given back once the consumer
    asks for the next tensor: it must not keep references to them (or views) beyond that."""
    if not names:
        return
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-prefetch"))
        readers = None if buffers is None else \
            stack.enter_context(ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="mergeflow-read"))
        load = functools.partial(_load, buffers=buffers, readers=readers)
        nxt = pool.submit(load, base, sources, names[0])
        try:
            for i, name in enumerate(names):
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


def _float32(theta0: torch.Tensor, device: torch.device) -> torch.Tensor:
    b = theta0.to(device=device, dtype=torch.float32)
    return b.clone() if b.data_ptr() == theta0.data_ptr() else b


def run(method: Method, base: Checkpoint, sources: Sequence[TaskVectors], hp: Mapping[str, Any], sink: Sink,
        device: torch.device = torch.device("cpu"), progress: Progress | None = None, data: Any = None) -> None:
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
            raise MergeflowError(f"method {method.name} needs {method.needs.replace('_', '-')} statistics of each task's "
                                 f"exemplars: run it in the pipeline, or pass data= to the engine")
        if len(data) != len(sources):
            raise MergeflowError(f"method {method.name}: statistics given for {len(data)} tasks, {len(sources)} models")
        ctx = kwargs["ctx"] = data
    elif method.prepare is not None:
        floating = [n for n in names if _is_floating(base, n)]

        def stream() -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
            for name, (theta0, raws) in _prefetched(base, sources, floating):
                b = _float32(theta0, device)
                yield name, b, [src.to_tau(r, b) for src, r in zip(sources, raws)]

        stream.names = tuple(floating)  # type: ignore[attr-defined]  # a prepare that needs only the names
        ctx = kwargs["ctx"] = method.prepare(stream, dict(hp))
    blockwise = method.is_blockwise(hp)
    if blockwise and method.kernel is not None:
        work = sum(math.prod(base.shape(n)) for n in names if _is_floating(base, n)) * len(sources)
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

    def __init__(self, theta0: torch.Tensor, raws: Sequence[torch.Tensor], sources: Sequence[TaskVectors],
                 device: torch.device, pool: ThreadPoolExecutor | None):
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
            return kernels.kth_abs_tau(kernels.as_array(self.theta0.reshape(-1)), kernels.as_array(raw.reshape(-1)),
                                       not self.sources[t].is_vector, k)
        return float(kth_largest(self(t).abs_(), k, checked=True))

    def map(self, fn: Callable[[int], Any], ts: Sequence[int] | range) -> list[Any]:
        """``[fn(t) for t in ts]``, on the engine's threads when it has them."""
        return list(self.pool.map(fn, ts)) if self.pool is not None else [fn(t) for t in ts]


def _fusable(device: torch.device, theta0: torch.Tensor, raws: Sequence[torch.Tensor]) -> bool:
    """Whether the fused CPU kernels read these inputs directly."""
    return (device.type == "cpu" and theta0.device.type == "cpu" and kernels.supported(theta0)
            and all(r.device.type == "cpu" and kernels.supported(r) and r.dtype == raws[0].dtype for r in raws)
            and kernels.available())


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
    fused = (fused and n_out == 1 and len({s.is_vector for s in sources}) == 1
             and _fusable(device, theta0, raws))
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
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeflow-block",
                              initializer=torch.set_num_threads, initargs=(1,))


def _add_base(deltas: Sequence[torch.Tensor], b: torch.Tensor) -> list[torch.Tensor]:
    """theta_0 + delta for each delta, in place where a delta is a float32 tensor of its own."""
    out, seen = [], {b.data_ptr()}
    for d in deltas:
        own = d.dtype == torch.float32 and d.device == b.device and d.shape == b.shape and d.data_ptr() not in seen
        seen.add(d.data_ptr())
        out.append(d.add_(b) if own else d + b)
    return out


def merge(method: Method, base: Checkpoint, sources: Sequence[TaskVectors], hp: Mapping[str, Any],
          device: torch.device = torch.device("cpu"), progress: Progress | None = None, data: Any = None) -> list[dict[str, torch.Tensor]]:
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
            out[name].view(-1)[start:start + blk.numel()] = blk.cpu()

    run(method, base, sources, hp, sink, device, progress, data)
    return outs


def merge_to_disk(method: Method, base: Checkpoint, sources: Sequence[TaskVectors], hp: Mapping[str, Any],
                  out_dir: str | Path, device: torch.device = torch.device("cpu"), dtype: torch.dtype | None = None,
                  progress: Progress | None = None, metadata: Mapping[str, str] | None = None, data: Any = None) -> list[Path]:
    """``run`` into checkpoints laid out like the base, written as the tensors are made.

    Static: ``out_dir`` is the checkpoint. Dynamic: ``out_dir/task_<i>/`` for the i-th source.
    Floating tensors are written in ``dtype`` (default: the base tensor's dtype). Atomic: on
    any error no ``out_dir`` is left behind (an existing one is kept unchanged).
    """
    from mergeflow.io.atomic import atomic_dir

    out_dir = Path(out_dir)
    meta = {"mergeflow_method": method.name, **dict(metadata or {})}
    if not method.dynamic:
        with CheckpointWriter(out_dir, like=base, dtype=dtype, metadata=meta) as w:
            run(method, base, sources, hp, lambda name, start, ts: w.write_block(name, start, ts[0]), device, progress, data)
        return [out_dir]
    with atomic_dir(out_dir) as tmp:
        writers = [CheckpointWriter(tmp / f"task_{i}", like=base, dtype=dtype, metadata={**meta, "task_index": str(i)})
                   for i in range(len(sources))]
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
    return [out_dir / f"task_{i}" for i in range(len(sources))]


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


def merge_state_dicts(method: Method, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                      hp: Mapping[str, Any] | None = None, device: str | torch.device = "cpu", data: Any = None) -> list[dict[str, torch.Tensor]]:
    """Merge in-memory state dicts: ``hp`` overlays the method's defaults (checked).

    Returns one merged state dict (static) or one per model (dynamic); floating tensors in float32.
    """
    b = MemoryCheckpoint(base, "<base>")
    sources = [TaskVectors.from_model(b, MemoryCheckpoint(m, f"<model {i}>")) for i, m in enumerate(models)]
    return merge(method, b, sources, hp or {}, torch.device(device) if isinstance(device, str) else device, data=data)
