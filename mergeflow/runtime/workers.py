"""Running the switch runtime's tasks: other devices' in order, CPU ones split into runs of about
equal entries over worker threads that each run torch single-threaded (chunk-sized operations
are slower when torch splits them over its thread pool)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels of this thread on ``n`` threads inside the block: chunk-sized
    operations are faster on one thread than split across a woken-up pool."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _null() -> Iterator[None]:
    yield


def new_pool(workers: int) -> Any:
    """``workers`` threads, each running torch's CPU kernels single-threaded."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="switch-runtime", initializer=torch.set_num_threads, initargs=(1,))


def run_tasks(tasks: list[tuple], workers: int, pool: Callable[[], Any]) -> None:
    """Run (entries, function, tensor, *args) tasks: other devices' here, in order; CPU ones
    on the worker threads (``pool()``, asked for only when needed), in as many runs of consecutive
    tasks as there are ``workers``, of about equal entries each (one pool call per worker, not one
    per task)."""
    cpu = [t for t in tasks if t[2].device.type == "cpu"]
    for task in tasks:
        if task[2].device.type != "cpu":
            task[1](*task[2:])
    if not cpu:
        return
    if workers == 1 or len(cpu) == 1:
        with _torch_threads(1):
            _run_all(cpu)
        return
    executor = pool()
    total, size = sum(t[0] for t in cpu), 0
    runs: list[list[tuple]] = []
    run: list[tuple] = []
    share = total / min(workers, len(cpu))
    for task in cpu:
        run.append(task)
        size += task[0]
        if size >= share * (len(runs) + 1) and len(runs) < workers - 1:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    futures = [executor.submit(_run_all, run) for run in runs]
    errors = [f.exception() for f in futures]  # waits for every run
    for error in errors:
        if error is not None:
            raise error


def _run_all(tasks: list[tuple]) -> None:
    for task in tasks:
        task[1](*task[2:])
