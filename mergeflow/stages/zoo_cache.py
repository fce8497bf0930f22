"""The built-in zoo, built once per machine and spec (DESIGN section 5): a cache of built zoos.

An entry is keyed by the seed, the zoo spec, the download stage's code digest and the torch
version, so a hit holds the files a fresh build would write, byte for byte (the build is
deterministic, tests/models/test_zoo.py). The cache lives in ``$MERGEFLOW_CACHE/zoo`` (default
``$XDG_CACHE_HOME/mergeflow`` or ``~/.cache/mergeflow``); ``MERGEFLOW_CACHE=off`` turns it off.
An entry is written under a temporary name and renamed whole; its ``entry.json`` records every
file's sha256, checked on each hit. A damaged entry is never used nor deleted: the zoo is built
afresh and the entry named in the log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

ENTRY = "entry.json"
FOLDERS = ("checkpoints", "heads", "data")


def cache_root() -> Path | None:
    """``$MERGEFLOW_CACHE`` (``off`` or empty: no cache), else the user's cache folder."""
    env = os.environ.get("MERGEFLOW_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none", "false") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mergeflow"


def key(seed: int, spec) -> str:
    """The entry's name: sha256 of the seed, the spec, the download stage's code and torch's version."""
    import torch

    from mergeflow.stages.spec import code_digest

    facts = {"seed": seed, "spec": asdict(spec), "code": code_digest("download"), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _files(root: Path) -> dict[str, str]:
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def build(dst: Path, seed: int, spec, log: Callable[[str], None]) -> dict:
    """Write the zoo's ``checkpoints/``, ``heads/`` and ``data/`` under the empty folder ``dst``
    and return its manifest: copied from the cache on a hit, else built (and then cached)."""
    from mergeflow.zoo import build_zoo

    root = cache_root()
    if root is None:
        return build_zoo(dst, seed=seed, spec=spec, progress=log)
    entry = root / "zoo" / key(seed, spec)
    if (entry / ENTRY).is_file():
        manifest = _copy_out(entry, dst, log)
        if manifest is not None:
            return manifest
        return build_zoo(dst, seed=seed, spec=spec, progress=log)
    manifest = build_zoo(dst, seed=seed, spec=spec, progress=log)
    try:
        _store(entry, dst, manifest)
    except OSError as e:  # a read-only or full cache costs the next run a build, nothing more
        log(f"download: zoo not cached ({entry.parent}: {e.strerror or e})")
    return manifest


def _copy_out(entry: Path, dst: Path, log: Callable[[str], None]) -> dict | None:
    try:
        record = json.loads((entry / ENTRY).read_text())
        for name in FOLDERS:
            shutil.copytree(entry / name, dst / name)
        if _files(dst) != record["files"]:
            raise ValueError("its files differ from the sha256s it recorded")
    except (OSError, ValueError, KeyError, TypeError) as e:
        for name in FOLDERS:
            shutil.rmtree(dst / name, ignore_errors=True)  # our partial copy, nothing of the entry's
        log(f"download: zoo cache entry {entry} is damaged ({e}); building afresh (remove it to rebuild the cache)")
        return None
    log(f"download: zoo from the cache ({entry})")
    return record["manifest"]


def _store(entry: Path, built: Path, manifest: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        for name in FOLDERS:
            shutil.copytree(built / name, tmp / name)
        (tmp / ENTRY).write_text(json.dumps({"manifest": manifest, "files": _files(tmp)}, indent=1) + "\n")
        try:
            os.rename(tmp, entry)  # whole or not at all; another process's entry, same bytes, wins
        except OSError:
            if not (entry / ENTRY).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
