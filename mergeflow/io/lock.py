"""One run per workspace: an exclusive lock on ``.mergeflow/run.lock`` (filelock), with who holds it.

Two runs on one workspace would write the same outputs; the second waits for the first (``wait``,
up to a timeout) or refuses at once (``refuse``), with one line naming the holder. The lock is the
operating system's (``flock``): a crashed or killed run releases it with its process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from mergeflow.errors import MergeflowError


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def workspace_lock(
    root: Path, mode: str = "wait", timeout: float = 3600.0, log: Callable[[str], None] = lambda msg: None
) -> Iterator[None]:
    """Hold the workspace for one run. ``mode`` "wait" waits up to ``timeout`` seconds, "refuse"
    fails at once; either way a failure is a one-line MergeflowError naming the holder."""
    from filelock import FileLock, Timeout

    from mergeflow.io.outputs import keep_tree

    state = keep_tree(Path(root) / ".mergeflow")  # the workspace's state: stamps, hashes, records
    owner = state / "run.owner.json"
    lock = FileLock(str(state / "run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if mode == "refuse":
            raise MergeflowError(
                f"{root}: workspace in use by another mergeflow run ({_holder(owner)}); refusing (run.lock: refuse)"
            ) from None
        log(f"workspace {root} is in use by another run ({_holder(owner)}): waiting up to {timeout:.0f} s")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise MergeflowError(
                f"{root}: workspace still in use by another mergeflow run ({_holder(owner)}) "
                f"after {timeout:.0f} s (run.lock_timeout)"
            ) from None
    try:
        owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def clean_stale(artifacts: Path) -> list[Path]:
    """Remove what a killed run left half-written beside its outputs (``.<name>.*.tmp`` / ``.old`` of
    atomic writes, ``.download.*`` work folders). Call only while holding the workspace lock."""
    import shutil

    removed: list[Path] = []
    if not Path(artifacts).is_dir():
        return removed
    stale = [p for p in Path(artifacts).rglob(".*") if p.name.startswith(".download.") or p.name.endswith((".tmp", ".old"))]
    for path in stale:
        if not path.exists() and not path.is_symlink():
            continue  # inside a folder removed before it
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
