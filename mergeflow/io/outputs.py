"""What mergeflow may replace: the one rule every write obeys.

mergeflow replaces only what it wrote itself, and never writes over or inside its inputs.
A directory it writes carries a marker file, ``.mergeflow-output``, listing every file it put
there (and the output's kind); a file it writes is recognised by its own content (a
``mergeflow.*`` safetensors container) or by the marker of the directory it lies in. A
directory is never written where a file is, nor the reverse; a symbolic link is never
replaced; an output may not be, contain, or lie inside any input.

:mod:`mergeflow.io.atomic` checks :func:`check_replaceable` at the moment of every rename, so
no writer can bypass the rule; commands call :func:`claim` first, given their inputs, so that
a refusal comes before any work. Every refusal is a one-line :class:`MergeflowError` naming
the path and the reason. The rule in full: docs/internals.md#outputs.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

from mergeflow.errors import MergeflowError

MARKER = ".mergeflow-output"
WRITER = "mergeflow"
TREE = "tree"  # a folder mergeflow keeps (workspace artifacts/ and .mergeflow/): its files are mergeflow's
_MAX_MARKER_BYTES = 16 << 20


# --- markers ------------------------------------------------------------------------------


def _listing(path: Path) -> list[str]:
    """Every entry below ``path`` (files, links and empty folders) as sorted relative POSIX
    paths, the marker itself left out; links are not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        for name in filenames:
            if not (rel == Path(".") and name == MARKER):
                out.append((rel / name).as_posix())
        for name in list(dirnames):
            full = Path(dirpath) / name
            if full.is_symlink():
                out.append((rel / name).as_posix())
                dirnames.remove(name)
            elif not any(full.iterdir()):
                out.append((rel / name).as_posix() + "/")
    return sorted(out)


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as a mergeflow output of ``kind``, listing what it holds now.

    Deterministic (no times, no process ids): the same output gives the same bytes, so DVC's
    hashes and byte-for-byte comparisons of outputs are unaffected by when they were written."""
    folder = Path(folder)
    files = [] if kind == TREE else _listing(folder)
    text = json.dumps({"writer": WRITER, "kind": kind, "files": files}, indent=1) + "\n"
    (folder / MARKER).write_text(text)


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` (None if it has none or it is not one mergeflow wrote)."""
    f = folder / MARKER
    try:
        if f.is_symlink() or not f.is_file() or f.stat().st_size > _MAX_MARKER_BYTES:
            return None
        data = json.loads(f.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("writer") != WRITER
        or not isinstance(data.get("kind"), str)
        or not isinstance(data.get("files"), list)
    ):
        return None
    return data


def keep_tree(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (a tree mergeflow keeps, e.g. a workspace's ``artifacts/``) if needed and
    mark it ``tree``; an existing folder is adopted as it is (nothing in it is touched)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise MergeflowError(f"{folder}: exists and is not a folder; mergeflow keeps its outputs there, move it away")
    folder.mkdir(parents=True, exist_ok=True)
    marker = read_marker(folder)
    if marker is None or marker["kind"] != TREE:
        if (folder / MARKER).exists() and marker is not None:
            raise MergeflowError(f"{folder}: is a mergeflow {marker['kind']} output, not a folder for a workspace's outputs")
        write_marker(folder, TREE)
    return folder


# --- ownership -----------------------------------------------------------------------------


def _file_format(path: Path) -> str | None:
    """``__metadata__.format`` of a safetensors file, read from its header alone (None otherwise)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_MARKER_BYTES:
                return None
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return fmt if isinstance(fmt, str) else None


def _owning_marker(path: Path) -> tuple[Path, dict] | None:
    """The nearest mergeflow marker above ``path`` (its folder, its content)."""
    for folder in path.parents:
        marker = read_marker(folder)
        if marker is not None:
            return folder, marker
    return None


def file_owner(path: Path) -> str | None:
    """What mergeflow wrote at the existing file ``path``: its container format (``mergeflow.switch``),
    or the kind of the mergeflow folder it lies in (None: not mergeflow's)."""
    fmt = _file_format(path)
    if fmt is not None and fmt.startswith("mergeflow."):
        return fmt
    found = _owning_marker(path)
    if found is not None:
        folder, marker = found
        if marker["kind"] == TREE or path.relative_to(folder).as_posix() in marker["files"]:
            return marker["kind"]
    return None


def check_replaceable(path: str | os.PathLike, is_dir: bool, kind: str | None = None) -> None:
    """Refuse (one line) unless ``path`` is absent or a mergeflow output that may be replaced by a
    new output (a folder when ``is_dir``, else a file) of ``kind``."""
    path = Path(path)
    if path.is_symlink():
        raise MergeflowError(f"{path}: is a symbolic link; mergeflow does not replace it (write elsewhere)")
    if not path.exists():
        if any(p.exists() and not p.is_dir() for p in path.parents):
            parent = next(p for p in path.parents if p.exists() and not p.is_dir())
            raise MergeflowError(f"{path}: cannot be created: {parent} is a file, not a folder")
        return
    if is_dir and not path.is_dir():
        raise MergeflowError(f"{path}: is a file, and this output is a folder; mergeflow does not replace it")
    if not is_dir and path.is_dir():
        raise MergeflowError(f"{path}: is a folder, and this output is a file; mergeflow does not replace it")
    if not is_dir:
        owner = file_owner(path)
        if owner is None:
            raise MergeflowError(
                f"{path}: exists and was not written by mergeflow; it is left as it is (move it away or write elsewhere)"
            )
        if kind is not None and owner.startswith("mergeflow.") and owner != kind:
            raise MergeflowError(
                f"{path}: is a {owner} file, not a {kind} one; it is left as it is (move it away or write elsewhere)"
            )
        return
    marker = read_marker(path)
    present = _listing(path)
    if marker is None:
        if not present and not (path / MARKER).exists():
            return  # an empty folder: nothing to lose
        raise MergeflowError(
            f"{path}: exists and is not a mergeflow output (no {MARKER} marker); "
            f"it is left as it is (move it away, empty it, or write elsewhere)"
        )
    if kind is not None and marker["kind"] not in (kind, TREE) and kind != TREE:
        raise MergeflowError(f"{path}: holds a mergeflow {marker['kind']} output, not a {kind} one; it is left as it is")
    if marker["kind"] == TREE:
        raise MergeflowError(f"{path}: is a folder mergeflow keeps outputs in, not an output to replace")
    listed = set(marker["files"])
    if foreign := [f for f in present if f not in listed]:
        raise MergeflowError(
            f"{path}: holds {foreign[0]}, which mergeflow did not write; it is left as it is "
            f"(move that file away to replace this output)"
        )


# --- inputs ---------------------------------------------------------------------------------


def _input_paths(inp: Path) -> list[Path]:
    """Where an input lives: its own real path and, for a folder, the real paths its links lead to."""
    real = [Path(os.path.realpath(inp))]
    if inp.is_dir():
        for dirpath, _, filenames in os.walk(inp):
            for name in filenames:
                f = Path(dirpath) / name
                if f.is_symlink():
                    real.append(Path(os.path.realpath(f)))
    return real


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse (one line) when ``out`` is, contains, or lies inside any of ``inputs``."""
    out = Path(out)
    real_out = Path(os.path.realpath(out))
    for inp in inputs:
        inp = Path(inp)
        for real in _input_paths(inp):
            if real_out == real:
                raise MergeflowError(f"{out}: is the input {inp}; mergeflow never writes over its inputs")
            if _within(real, real_out):
                raise MergeflowError(f"{out}: contains the input {inp}; mergeflow never writes over its inputs")
            if _within(real_out, real):
                raise MergeflowError(f"{out}: lies inside the input {inp}; mergeflow never writes into its inputs")


def claim(out: str | os.PathLike, *, is_dir: bool, kind: str | None = None, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check, before any work, that ``out`` may receive a new output: apart from every input and
    absent or replaceable (:func:`check_replaceable`). Returns ``out`` as a Path."""
    out = Path(out)
    check_apart(out, inputs)
    check_replaceable(out, is_dir, kind)
    return out
