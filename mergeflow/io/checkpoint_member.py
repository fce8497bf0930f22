"""Containment: a file named inside a checkpoint (an index's shard, a config, an adapter) must
lie in the checkpoint's folder, or in its Hugging Face cache snapshot's blobs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergeflow.errors import MergeflowError

_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really live: the folder itself, and for a folder inside a
    Hugging Face cache snapshot (``<cache>/models--org--name/snapshots/<commit>/...``) the
    repository's ``blobs/``, which the snapshot's files link to."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    for a in (real, *real.parents):
        if (
            _SNAPSHOT.fullmatch(a.name)
            and a.parent.name == "snapshots"
            and a.parent.parent.name.startswith(("models--", "datasets--"))
        ):
            roots.append(a.parent.parent / "blobs")
            break
    return roots


def member_of(folder: str | Path, rel: str, what: str = "") -> Path:
    """``folder / rel`` for a file named inside a checkpoint (an index's shard, a config, an
    adapter), refused in one line when the name or the file it leads to (through any symbolic
    link) lies outside the folder, or outside its Hugging Face cache snapshot. Reads never leave
    the checkpoint they belong to."""
    folder = Path(folder)
    who = what or f"{folder}: {rel!r}"
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel or "\x00" in rel:
        raise MergeflowError(f"{who} names a file outside the checkpoint folder {folder}; refused")
    path = folder / rel
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in _allowed_roots(folder)):
        raise MergeflowError(f"{who} leads outside the checkpoint folder {folder} (to {real}); refused")
    return path
