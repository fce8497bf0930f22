"""Atomic outputs: everything is written under a temporary name beside its target and renamed
into place, so a crash leaves the old output or none, never half of one.

Every rename first checks :func:`mergeflow.io.outputs.check_replaceable`: an existing target is
replaced only when mergeflow wrote it, so no writer can delete or overwrite a user's file.
Folders written here get the marker that proves it (``.mergeflow-output``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mergeflow.io.outputs import check_replaceable, write_marker

CHECKPOINT = "checkpoint"  # the kind of a folder written through atomic_dir unless told otherwise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, kind: str | None = None, user_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    An existing ``path`` must be a file mergeflow wrote (checked before and at the rename; of
    ``kind``, a container format such as ``mergeflow.switch``, if given), except
    with ``user_file``: a file of the user's that the command was asked to edit (``mergeflow run
    --set`` writes its overrides into the params file, as ``dvc exp run -S`` does)."""
    path = Path(path)
    if not user_file:
        check_replaceable(path, is_dir=False, kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if not user_file:
            check_replaceable(path, is_dir=False, kind=kind)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def replace_whole(src: str | os.PathLike, path: str | os.PathLike, kind: str | None = None) -> None:
    """Put ``src`` (a finished folder or file on the same filesystem) at ``path``: an existing
    ``path`` is moved aside first and deleted only after ``src`` is in place, so ``path`` is
    always the complete old or the complete new one (a leftover ``.<name>.*.old`` is stale).
    An existing ``path`` must be a mergeflow output of the same form (and ``kind``, if given)."""
    src, path = Path(src), Path(path)
    check_replaceable(path, is_dir=src.is_dir(), kind=kind)
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(src, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = CHECKPOINT) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole.

    The old directory (if any) is moved aside first and deleted only after the new one is in
    place, so at every instant ``path`` is either the complete old or the complete new output.
    An existing ``path`` must be a mergeflow output of ``kind`` holding only files it wrote
    (checked here, before the caller's work, and again at the rename); the new folder gets the
    marker listing its files.
    """
    path = Path(path)
    check_replaceable(path, is_dir=True, kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        write_marker(tmp, kind)
        replace_whole(tmp, path, kind)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
