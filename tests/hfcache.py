"""Hugging Face cache layouts for offline tests: folders saved with ``save_pretrained`` or
``Dataset.to_parquet`` become ``hf://`` repos that huggingface_hub resolves with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def hf_cache(cache, repo, commit, files, *, repo_type="model", refs=("main",)):
    """One commit of a repo in huggingface_hub's cache layout: blobs/, refs/<ref> (the commit, no newline),
    snapshots/<commit>/<path> links into blobs/. ``files`` maps repo paths to writers ``f(path)``."""
    cache = Path(cache)
    storage = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    snap = storage / "snapshots" / commit
    for name, write in files.items():
        blob = storage / "blobs" / f"{commit[:8]}-{name.replace('/', '_')}"
        write(blob)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def fake_commit(*parts: str) -> str:
    """A deterministic 40-hex commit id."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def add_folder(cache, repo, folder, *, repo_type="model", commit=None, refs=("main",)) -> str:
    """Put every file under ``folder`` into the cache as ``repo`` at ``commit``; returns the commit."""
    folder = Path(folder)
    commit = commit or fake_commit(repo_type, repo, *sorted(str(p.relative_to(folder)) for p in folder.rglob("*")))
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[f.relative_to(folder).as_posix()] = (lambda src: lambda dst: shutil.copyfile(src, dst))(f)
    hf_cache(cache, repo, commit, files, repo_type=repo_type, refs=refs)
    return commit


def sh(cmd, cwd):
    """Run a command in ``cwd``; its stdout, or an assertion naming the command with its output."""
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def pipeline_workspace(ws, params: dict) -> Path:
    """A git + DVC workspace at ``ws`` with the project's dvc.yaml, its code deps and ``params``."""
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    ws = Path(ws)
    ws.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(root / name, ws / name)
    shutil.copytree(root / "mergeflow", ws / "mergeflow", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], ws)
    sh([sys.executable, "-m", "dvc", "init", "-q"], ws)
    return ws


SMALL_ZOO = {
    "n_tasks": 2,
    "max_samples": 400,
    "hidden_size": 32,
    "num_layers": 2,
    "intermediate_size": 64,
    "pretrain_epochs": 3,
    "finetune_epochs": 2,
}


def small_zoo_params(**run) -> dict:
    """The repository's params.yaml on a small 2-task zoo (about 30 s a run), ``run`` options set."""
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["download"]["zoo"] = SMALL_ZOO
    params["compress"]["queries"] = 10
    params["merge"]["autoswitch"] = {"k": 3}
    params["evaluate"]["plots"] = False
    params["run"] |= run
    return params


def reported_rows(methods: list[str]) -> set[str]:
    """The rows metrics.json has for these methods: Auto-Switch has one per routing mode."""
    return {
        r for m in methods for r in ([f"autoswitch_{mode}" for mode in ("batch", "sample", "hard")] if m == "autoswitch" else [m])
    }
