"""Run a command and measure its wall time and peak memory; read checkpoints lazily.

Peak memory:
  peak RSS     ``ru_maxrss`` of the command's own process (the kernel's high-water mark of its
               resident set, the largest of it and any child it waited for), as
               ``/usr/bin/time -v`` "Maximum resident set size" reports it. It counts file pages
               the process has mapped (safetensors are mmap'ed). A command started directly
               from this (large) Python process would inherit its high-water mark through
               vfork+exec, so it is started from a tiny launcher (``python -I -S``) that forks,
               execs the command, waits for it with ``os.wait4`` and reports that child's own
               ``ru_maxrss`` and wall time.
  tree RSS     the largest sum of RSS over the process and all its descendants, polled from
               /proc every ``interval`` s (catches tools that fan out into worker processes).
  anon RSS     the largest polled sum of RssAnon (private memory: what cannot be dropped by
               the kernel), for diagnosis; RssFile is the mmap'ed file part.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class RunResult:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_rss: int  # bytes, ru_maxrss of the process
    tree_rss: int  # bytes, polled max of the tree's summed RSS
    anon_rss: int  # bytes, polled max of the tree's summed RssAnon
    log: Path
    killed: bool = False  # by the rss_limit

    @property
    def peak(self) -> int:
        return max(self.peak_rss, self.tree_rss)


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_LAUNCHER = r"""
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {wall!r}\n")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(
    cmd: list[str],
    log: Path,
    env: dict | None = None,
    interval: float = 0.02,
    cwd: str | None = None,
    rss_limit: int | None = None,
) -> RunResult:
    """Run ``cmd`` (stdout+stderr to ``log``), returning wall time and peak memory.

    ``rss_limit`` (bytes): kill the command's process tree once its summed RSS passes this, to
    protect a shared machine (the result then has rc -9 and ``killed`` set)."""
    import sys

    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    peaks = {"tree": 0, "anon": 0}
    done = threading.Event()
    stats = Path(str(log) + ".rusage")
    stats.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(stats), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )

        def poll() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                try:
                    procs = root.children(recursive=True)  # the command's tree, not the launcher
                except psutil.Error:
                    break
                rss = anon = 0
                for p in procs:
                    rss += _status_kb(p.pid, "VmRSS:")
                    anon += _status_kb(p.pid, "RssAnon:")
                peaks["tree"] = max(peaks["tree"], rss * 1024)
                peaks["anon"] = max(peaks["anon"], anon * 1024)
                if rss_limit and rss * 1024 > rss_limit:
                    peaks["killed"] = 1
                    for p in reversed(procs):
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
                    break
                done.wait(interval)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    if peaks.get("killed"):
        with open(log, "a") as f:
            f.write(f"\nbench: killed: process tree RSS passed the limit of {rss_limit / 2**20:.0f} MiB\n")
    try:
        maxrss_kb, wall = stats.read_text().split()
    except (OSError, ValueError):
        raise RuntimeError(f"launcher for {cmd[0]} failed (rc {rc}); see {log}") from None
    stats.unlink()
    return RunResult(
        cmd, rc, float(wall), int(maxrss_kb) * 1024, peaks["tree"], peaks["anon"], Path(log), bool(peaks.get("killed"))
    )


def drop_writeback() -> None:
    """Flush dirty pages (a previous run's output) so they are not written during the next run."""
    os.sync()


# ---------------------------------------------------------------------------------------------
# Lazy checkpoint reading (any layout: one file, a directory, shards with an index)


def _tensor_files(ckpt: Path) -> dict[str, Path]:
    import json

    ckpt = Path(ckpt)
    if ckpt.is_file():
        files = [ckpt]
    elif (ckpt / "model.safetensors.index.json").exists():
        wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted({ckpt / f for f in wm.values()})
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                out[k] = f
    return out


class LazyCkpt:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = _tensor_files(self.path)

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str):
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as fh:
            return fh.get_tensor(name)
