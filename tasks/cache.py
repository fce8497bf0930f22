"""Stage caching by inputs: a stage is skipped when its fingerprint (its params, its own code and
the digests of its upstream stages' outputs, all as mergeflow/stages/spec.py's table says, which
dvc.yaml is generated from) matches the stamp of its last run and its own outputs are still
exactly as that run left them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mergeflow
from mergeflow.io.atomic import write_json
from mergeflow.params import Params
from mergeflow.stages import Layout, spec


def stamp_path(root: Path, stage: str) -> Path:
    return root / ".mergeflow" / "stamps" / f"{stage}.json"


def code_digest() -> str:
    """Hash of the whole library's source: a GPU worker must run the same code as the pipeline.
    (Staleness uses each stage's own code, ``spec.code_digest(stage)``, as dvc.yaml's deps do.)"""
    h = hashlib.sha256()
    pkg = Path(mergeflow.__file__).parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class _HashState:
    """Content hashes of files keyed by (path, size, mtime, inode), so unchanged files are read once.

    Content, not mtime, identifies an output: ``dvc commit`` re-links outputs from its cache,
    which changes their mtime but not their bytes.
    """

    def __init__(self, root: Path):
        self.path = root / ".mergeflow" / "hashes.json"
        try:
            self.table: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False

    def md5(self, f: Path) -> str:
        st = f.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.table.get(str(f))
        if hit and hit[:3] == key:
            return hit[3]
        h = hashlib.md5()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        self.table[str(f)] = [*key, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.table)


def outs_digest(paths: list[Path], root: Path) -> str | None:
    """Identity of a stage's outputs (relative path and content hash of every file); None if one is missing."""
    state = _HashState(root)
    h = hashlib.sha256()
    for path in paths:
        if not path.exists():
            return None
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            h.update(f"{f.relative_to(path.parent)}\0{state.md5(f)}\n".encode())
    state.save()
    return h.hexdigest()


def read_stamp(root: Path, stage: str) -> dict | None:
    try:
        return json.loads(stamp_path(root, stage).read_text())
    except (OSError, ValueError):
        return None


def fingerprint(p: Params, root: Path, stage: str) -> str | None:
    """None when an upstream stage has no valid stamp (then this stage must run)."""
    parts: dict[str, Any] = {
        "stage": stage,
        "params": p.section(*spec.SPEC[stage].params),
        "code": spec.code_digest(stage),
        "upstream": {},
    }
    if stage == "download" and p.download.family is not None:
        # hub refs re-resolved (a branch may have moved), local folders re-hashed (cached by stat)
        from mergeflow.errors import MergeflowError
        from mergeflow.stages.download import upstream_state

        try:
            parts["sources_now"] = upstream_state(p, lambda path: outs_digest([path], root), root)
        except MergeflowError:
            return None  # cannot tell: run the stage (it fails with the reason, if there is one)
    for up in spec.upstream(stage):
        stamp = read_stamp(root, up)
        if stamp is None:
            return None
        parts["upstream"][up] = stamp["outs"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def is_fresh(p: Params, root: Path, stage: str) -> bool:
    stamp = read_stamp(root, stage)
    fp = fingerprint(p, root, stage)
    return bool(stamp and fp and stamp["fingerprint"] == fp and stamp["outs"] == outs_digest(Layout(root).outs(stage), root))


def write_stamp(p: Params, root: Path, stage: str, summary: dict) -> None:
    fp = fingerprint(p, root, stage)
    outs = outs_digest(Layout(root).outs(stage), root)
    write_json(stamp_path(root, stage), {"fingerprint": fp, "outs": outs, "summary": summary, "pid": os.getpid()})


def invalidate(root: Path, stage: str) -> None:
    stamp_path(root, stage).unlink(missing_ok=True)
