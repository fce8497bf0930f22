"""DVC: commit the stage outputs to the cache so every merge is versioned by dvc.lock."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import get_run_logger, task

from mergeflow.errors import MergeflowError

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").exists()


def dvc(args: list[str], cwd: Path, what: str, retry_delays: tuple[float, ...] = ()) -> str:
    """Run ``python -m dvc ARGS`` in ``cwd`` (a subprocess: DVC resolves paths against the working
    directory, which a flow must not change); tried again after each of ``retry_delays`` seconds
    (network steps); a failure is one line naming what was being done. Returns stdout."""
    for delay in (*retry_delays, None):
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=dict(os.environ, DVC_NO_ANALYTICS="1"),
        )
        if proc.returncode == 0 or delay is None:
            break
        time.sleep(delay)
    if proc.returncode != 0:
        raise MergeflowError(f"{what} failed in {cwd} (dvc {' '.join(args)}): {dvc_reason(proc.stderr, proc.stdout)}")
    return proc.stdout


def dvc_reason(stderr: str, stdout: str = "") -> str:
    """DVC's own reason in one line: its ``ERROR:`` lines (the prefix dropped), else the last
    lines it printed, else that it printed nothing."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    text = "; ".join(errors) or " ".join(lines[-3:]) or "DVC gave no reason"
    return " ".join(text.split())[:400]


@task(name="dvc-commit", cache_policy=None)
def dvc_commit(root: Path) -> str | None:
    """``dvc commit`` every stage of dvc.yaml; returns the sha256 of the resulting dvc.lock."""
    log = get_run_logger()
    if not is_dvc_repo(root):
        log.warning("%s is not a DVC repository with a dvc.yaml: outputs not versioned (run `dvc init`)", root)
        return None
    dvc(["commit", "--force"], root, "dvc commit")
    digest = lock_digest(root)
    log.info("dvc: outputs committed, dvc.lock sha256 %s", (digest or "")[:12])
    return digest


def lock_digest(root: Path) -> str | None:
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@task(name="dvc-push", cache_policy=None, retries=3, retry_delay_seconds=[2, 8, 30])
def dvc_push(root: Path, remote: str) -> None:
    """``dvc push -r REMOTE``: the committed outputs to the team's remote (retried: it is the network)."""
    dvc(["push", "-r", remote], root, f"dvc push -r {remote}")
    get_run_logger().info("dvc: outputs pushed to remote %r", remote)
