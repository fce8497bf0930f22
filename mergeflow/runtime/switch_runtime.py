"""``SwitchRuntime``: apply, switch and remove weighted sums of task switches in place on live
model weights, restoring them bitwise (see docs/runtime.md)."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from mergeflow import kernels
from mergeflow.codecs.switch import Switch
from mergeflow.errors import MergeflowError
from mergeflow.runtime import chunks  # its kernels are called through the module: tests replace them there
from mergeflow.runtime.chunks import CPU_CHUNK, CUDA_CHUNK, _fused, _kernel_view, _work_dtype, _Workspace
from mergeflow.runtime.packing import PackedSwitch, unpack_ternary
from mergeflow.runtime.plan import _Backup, _Piece, _Plan, _tail
from mergeflow.runtime.workers import _null, _torch_threads, new_pool, run_tasks


def _as_weight(key: str, value: Any) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise MergeflowError(f"switch weight {key}: expected a number, got {value!r}") from None
    if not math.isfinite(w):
        raise MergeflowError(f"switch weight {key}: {w} is not finite")
    return w


class SwitchRuntime:
    """Apply and remove weighted sums of task switches in place on live model weights.

    ``params`` maps names to the tensors a model computes with (``dict(model.named_parameters())``
    or a state dict whose tensors the model uses); they are modified in place. ``switches`` maps
    task names to ``Switch`` (or ``PackedSwitch``); each switch's bits are packed and moved once
    to its tensors' devices. Every tensor a switch names must be in ``params`` with its shape.

    ``apply(weights)`` adds sum_t w_t * s_t * B_t (and w_t * dense_t for dense tensors) to each
    tensor; ``remove()`` restores every tensor bitwise. One combination is active at a time.
    Memory beyond the weights: the packed switches (``packed_nbytes``), a few chunk-sized
    buffers per worker, and while a combination is active ``backup_nbytes``: the original values
    (and int32 positions) of only those touched entries that subtraction cannot restore, a subset
    of the entries the applied switches touch, plus the whole of any tensor a dense switch tensor
    touches. Entries no applied switch touches are never written. Removal assumes the weights
    were not changed while the combination was active.

    ``chunk``: entries per step (default 2**18 on CPU, 2**22 elsewhere). ``workers``: CPU threads
    that process chunks in parallel, each running torch single-threaded (default: torch's thread
    count, at most 8); other devices use one.
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        switches: Mapping[str, Switch | PackedSwitch],
        *,
        chunk: int | None = None,
        workers: int | None = None,
    ):
        if chunk is not None and (chunk < 8 or chunk % 8):
            raise MergeflowError(f"chunk must be a positive multiple of 8, got {chunk}")
        if workers is not None and workers < 1:
            raise MergeflowError(f"workers must be at least 1, got {workers}")
        self.params = dict(params)
        self._chunk = chunk
        self._workers = workers if workers is not None else max(1, min(8, torch.get_num_threads()))
        self.switches: dict[str, PackedSwitch] = {}
        touched: dict[int, str] = {}
        for key, switch in switches.items():
            packed = PackedSwitch.from_switch(switch)
            for name in packed.names:
                if name not in self.params:
                    raise MergeflowError(f"switch {key}: tensor {name} is not among the model's parameters")
            tensors, dense = {}, {}
            for name, pt in packed.tensors.items():
                p = self.params[name]
                if tuple(pt.shape) != tuple(p.shape):
                    raise MergeflowError(f"switch {key}: tensor {name} has shape {list(pt.shape)}, the model has {list(p.shape)}")
                if p.is_floating_point():  # like apply_switch: integer tensors are never changed
                    tensors[name] = pt.to(p.device)
            for name, d in packed.dense.items():
                p = self.params[name]
                if tuple(d.shape) != tuple(p.shape):
                    raise MergeflowError(
                        f"switch {key}: dense tensor {name} has shape {list(d.shape)}, the model has {list(p.shape)}"
                    )
                if p.is_floating_point():
                    dense[name] = d.to(p.device)
            for name in [*tensors, *dense]:
                if not self.params[name].numel():
                    continue
                ptr = self.params[name].data_ptr()
                if touched.setdefault(ptr, name) != name:
                    raise MergeflowError(
                        f"tensors {touched[ptr]} and {name} share memory (tied weights): give the runtime one of them"
                    )
            self.switches[key] = PackedSwitch(tensors, dense, list(packed.skipped), dict(packed.metadata))
        self._workspaces: dict[tuple[torch.device, int], _Workspace] = {}
        self._arrays: dict[tuple[int, int, torch.dtype], np.ndarray] = {}
        self._gen = 0
        self._pool: Any = None
        self._active: dict[str, float] | None = None
        self._plans: dict[str, _Plan] = {}
        self._backup: dict[str, _Backup] = {}

    # --- state -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The switches' names, in the order weight columns follow."""
        return list(self.switches)

    @property
    def active(self) -> dict[str, float] | None:
        """The applied combination (name -> weight), or None."""
        return None if self._active is None else dict(self._active)

    @property
    def backup_nbytes(self) -> int:
        """Bytes the active combination's backup holds (0 when none is active)."""
        return sum(b.nbytes for b in self._backup.values())

    @property
    def packed_nbytes(self) -> int:
        """Bytes the packed switches hold."""
        return sum(s.nbytes for s in self.switches.values())

    def __repr__(self) -> str:
        return f"SwitchRuntime({len(self.switches)} switches, {len(self.params)} tensors, active={self._active})"

    # --- apply / remove ------------------------------------------------------------------------

    def weights_dict(self, weights: Mapping[str, Any] | torch.Tensor | Any) -> dict[str, float]:
        """A combination as name -> weight: a mapping, or one weight per switch in ``names`` order."""
        if isinstance(weights, Mapping):
            out = {}
            for key, value in weights.items():
                if key not in self.switches:
                    raise MergeflowError(f"switch weight {key}: no such switch (have {', '.join(self.switches) or 'none'})")
                out[key] = _as_weight(key, value)
            return out
        values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).tolist()
        if len(values) != len(self.switches):
            raise MergeflowError(f"{len(values)} switch weights for {len(self.switches)} switches")
        return {key: _as_weight(key, v) for key, v in zip(self.switches, values)}

    def _plan(self, weights: dict[str, float]) -> dict[str, _Plan]:
        plans: dict[str, _Plan] = {}
        for key, w in weights.items():
            if w == 0.0:
                continue
            switch = self.switches[key]
            for name, pt in switch.tensors.items():
                if pt.n_kept and pt.scale != 0.0:
                    plans.setdefault(name, _Plan([], [])).binary.append((w * pt.scale, pt))
            for name, d in switch.dense.items():
                plans.setdefault(name, _Plan([], [])).dense.append((w, d))
        order = {name: i for i, name in enumerate(self.params)}
        return dict(sorted(plans.items(), key=lambda item: order[item[0]]))

    @torch.no_grad()
    def apply(self, weights: Mapping[str, Any] | torch.Tensor) -> None:
        """Add sum_t w_t * s_t * B_t to the weights in place (``weights``: name -> w_t, or one
        weight per switch in ``names`` order; switches left out or weighted 0 do nothing).
        On failure whatever was changed is restored before the error propagates."""
        if self._active is not None:
            raise MergeflowError(f"a switch combination is already applied ({self._active}): remove() it first, or switch()")
        combo = self.weights_dict(weights)
        plans = self._plan(combo)
        self._active, self._plans, self._backup = combo, plans, {}
        self._next_generation()
        try:
            tasks = []
            for name, plan in plans.items():
                tasks.extend(self._apply_tasks(name, plan))
            self._run(tasks)
        except BaseException:
            self.remove()
            raise

    @torch.no_grad()
    def switch(self, weights: Mapping[str, Any] | torch.Tensor) -> None:
        """Go from the applied combination to ``weights`` (``apply`` when none is applied): the
        weights end bitwise as ``remove()`` then ``apply(weights)`` would leave them, with one
        pass over each tensor both combinations touch (fused CPU kernels: the old step is taken
        off and the new one put on tile by tile, while the tile is in cache) instead of two.
        On failure the weights are restored to the base before the error propagates."""
        if self._active is None:
            return self.apply(weights)
        combo = self.weights_dict(weights)
        if combo == self._active:
            return
        plans = self._plan(combo)
        old = self._backup
        swap = {name for name, plan in plans.items() if self._swappable(name, plan, old.get(name))}
        self._run(self._remove_tasks({name: b for name, b in old.items() if name not in swap}))
        self._active, self._plans, self._backup = combo, plans, {}
        self._next_generation()
        swapped: dict[int, int] = {}  # id(old piece) -> its entries swapped so far
        try:
            tasks = []
            for name, plan in plans.items():
                if name not in swap:
                    tasks.extend(self._apply_tasks(name, plan))
                    continue
                flat, backup = self.params[name].detach().view(-1), _Backup(plan)
                self._backup[name] = backup
                tasks.extend(
                    (piece.length, self._swap_task, flat, old[name].plan, plan, piece, backup.pieces, swapped)
                    for piece in old[name].pieces
                )
            self._run(tasks)
        except BaseException:
            left = {}  # the old combination where it was not swapped yet
            for name in swap:
                pieces = [_tail(piece, swapped.get(id(piece), 0)) for piece in old[name].pieces]
                left[name] = _Backup(old[name].plan, pieces=[p for p in pieces if p.length])
            try:
                self._run(self._remove_tasks(left))
            finally:
                self.remove()
            raise

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the weights bitwise to what they were before ``apply`` (no-op when nothing is applied)."""
        if self._active is None:
            return
        self._run(self._remove_tasks(self._backup))
        self._active, self._plans, self._backup = None, {}, {}

    def _next_generation(self) -> None:
        """New backups go to the other generation of every worker's arenas (the current one may
        still hold the backups a switch reads), emptied first."""
        self._gen ^= 1
        for ws in self._workspaces.values():
            ws.gen = self._gen
            for (_, gen), arena in ws.arenas.items():
                if gen == self._gen:
                    arena.reset()

    def _apply_tasks(self, name: str, plan: _Plan) -> list[tuple]:
        """Apply ``plan`` to tensor ``name``: dense-touched and strided tensors now, contiguous
        ones as tasks (one per range) recording their backup in ``_backup``."""
        p = self.params[name].detach()
        if plan.dense:
            self._apply_full(name, plan)
            return []
        if not p.is_contiguous():  # changed through a contiguous copy of it (one tensor at a time)
            self._apply_strided(name, plan)
            return []
        backup = self._backup[name] = _Backup(plan)
        return [(end - begin, self._apply_task, p.view(-1), plan, begin, end, backup.pieces) for begin, end in self._ranges(p)]

    def _remove_tasks(self, backups: Mapping[str, _Backup]) -> list[tuple]:
        """Undo ``backups``: whole-tensor and strided ones now, the rest as tasks of about one
        range's entries each."""
        tasks = []
        for name, backup in backups.items():
            p = self.params[name].detach()
            if backup.full is not None:
                p.copy_(backup.full)
            elif not backup.in_place:
                flat = p.contiguous().view(-1)
                with _torch_threads(1) if p.device.type == "cpu" else _null():
                    chunks._remove_chunks(flat, backup.plan, backup.pieces, self._workspace(p.device))
                p.copy_(flat.view(p.shape))
            else:
                span, group, size = self._span(p.device), [], 0
                for piece in backup.pieces:
                    group.append(piece)
                    size += piece.length
                    if size >= span:
                        tasks.append((size, self._remove_task, p.view(-1), backup.plan, group))
                        group, size = [], 0
                if group:
                    tasks.append((size, self._remove_task, p.view(-1), backup.plan, group))
        return tasks

    def _swappable(self, name: str, plan: _Plan, backup: _Backup | None) -> bool:
        """Whether ``switch`` can take tensor ``name`` from ``backup``'s combination to ``plan``'s
        in one fused pass (both binary-only, the tensor contiguous, every piece the kernel's)."""
        if backup is None or plan.dense or backup.plan.dense or backup.full is not None or not backup.in_place:
            return False
        flat = self.params[name].detach()
        return flat.is_contiguous() and _fused(flat.view(-1)) and all(piece.fused for piece in backup.pieces)

    @contextmanager
    def use(self, weights: Mapping[str, Any] | torch.Tensor) -> Iterator["SwitchRuntime"]:
        """``with runtime.use({"task": 1.0}): ...``: applied inside the block, removed after it."""
        self.apply(weights)
        try:
            yield self
        finally:
            self.remove()

    def close(self) -> None:
        """Stop the worker threads (they are started again when needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- execution -------------------------------------------------------------------------------

    def _workspace(self, device: torch.device) -> _Workspace:
        key = (device, threading.get_ident())
        ws = self._workspaces.get(key)
        if ws is None:
            chunk = self._chunk or (CPU_CHUNK if device.type == "cpu" else CUDA_CHUNK)
            ws = self._workspaces[key] = _Workspace(device, chunk)
            ws.gen = self._gen
        return ws

    def _span(self, device: torch.device) -> int:
        """Entries per task: several chunks, so that workers share big tensors."""
        return 8 * self._workspace(device).chunk

    def _ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        n, span = p.numel(), self._span(p.device)
        return [(begin, min(begin + span, n)) for begin in range(0, n, span)]

    def _array(self, flat: torch.Tensor) -> np.ndarray:
        """A contiguous CPU tensor's kernel array (``kernels.as_array``), made once per tensor."""
        key = (flat.data_ptr(), flat.numel(), flat.dtype)
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = kernels.as_array(flat)
        return array

    def _apply_task(self, flat, plan, begin, end, sink) -> None:
        ws = self._workspace(flat.device)
        if _fused(flat):
            chunks._apply_chunks_fused(self._array(flat), plan, begin, end, ws, sink)
        else:
            chunks._apply_chunks(flat, plan, begin, end, ws, sink)

    def _swap_task(self, flat, old_plan, plan, piece, sink, swapped) -> None:
        """Take ``piece`` of ``flat`` from ``old_plan``'s combination to ``plan``'s (fused kernel),
        appending the new pieces to ``sink`` and the progress to ``swapped``."""
        x = self._array(flat)
        arena = self._workspace(flat.device).arena(x.itemsize)
        end = piece.start + piece.length
        xs, bits_a, coefs_a = _kernel_view(x, old_plan, piece.start, end)
        _, bits_b, coefs_b = _kernel_view(x, plan, piece.start, end)
        pos_a, vals_a = piece.pos.numpy(), piece.vals.numpy()
        done, want = 0, kernels.SWITCH_TILE + kernels.SWITCH_SLACK
        while done < piece.length:
            pos, vals = arena.take(want)
            stop, n = kernels.switch_swap(xs, bits_a, coefs_a, pos_a, vals_a, bits_b, coefs_b, done, pos, vals)
            sink.append(
                _Piece(piece.start + done, stop - done, torch.from_numpy(pos[:n]), torch.from_numpy(vals[:n]), fused=True)
            )
            arena.commit(n)
            swapped[id(piece)] = done = stop

    def _remove_task(self, flat, plan, pieces) -> None:
        chunks._remove_chunks(flat, plan, pieces, self._workspace(flat.device), self._array(flat) if _fused(flat) else None)

    def _run(self, tasks: list[tuple]) -> None:
        """Run (entries, function, tensor, *args) tasks on this runtime's workers (``run_tasks``)."""
        run_tasks(tasks, self._workers, self._thread_pool)

    def _thread_pool(self) -> Any:
        """The worker threads, started on first use (``close`` stops them)."""
        if self._pool is None:
            self._pool = new_pool(self._workers)
        return self._pool

    def _apply_full(self, name: str, plan: _Plan) -> None:
        """A tensor some dense switch tensor touches: saved whole, then updated in one step."""
        p = self.params[name].detach()
        self._backup[name] = _Backup(plan, full=p.clone())
        wdt = _work_dtype(p.dtype)
        d: torch.Tensor | None = None
        for w, dense in plan.dense:
            term = dense.to(wdt) * w
            d = term if d is None else d.add_(term)
        assert d is not None  # called for the tensors a dense switch tensor touches
        for c, pt in plan.binary:
            d.add_(unpack_ternary(pt.bits, pt.numel).reshape(pt.shape), alpha=c)
        p.copy_((p.to(wdt) + d).to(p.dtype))

    def _apply_strided(self, name: str, plan: _Plan) -> None:
        p = self.params[name].detach()
        flat = p.contiguous().view(-1)
        pieces: list[_Piece] = []
        with _torch_threads(1) if p.device.type == "cpu" else _null():
            chunks._apply_chunks(flat, plan, 0, flat.numel(), self._workspace(p.device), pieces)
        p.copy_(flat.view(p.shape))
        self._backup[name] = _Backup(plan, pieces=pieces, in_place=False)  # recorded once p holds the result
