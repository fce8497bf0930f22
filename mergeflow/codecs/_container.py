"""The checked container both codec formats share: a safetensors file whose metadata names the
format and version and carries the CRC-32 of a zlib-compressed JSON index; the index holds the
CRC-32 of every stored tensor. Readers here turn any inconsistency into a one-line
MergeflowError naming the file."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_file
from mergeflow.io.checkpoint import canonical_header


def raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (for checksums), any dtype: a view of its uint8 array."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def write(path: str | os.PathLike, stored: dict[str, torch.Tensor], index: dict, format_name: str, format_version: int) -> None:
    """Write ``stored`` (CPU tensors) and ``index`` (JSON-able; the tensors' CRC-32s are added
    under ``crc32``) to ``path`` atomically, with a canonical header."""
    index = {**index, "crc32": {key: zlib.crc32(raw(t)) for key, t in stored.items()}}
    packed = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    stored = {**stored, "index": torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy())}
    header = {"format": format_name, "format_version": str(format_version), "index_crc32": str(zlib.crc32(packed))}
    with atomic_file(path, kind=format_name) as tmp:
        save_file(stored, tmp, metadata=header)
        canonical_header(tmp)


def fail(path: str | os.PathLike, what: str) -> MergeflowError:
    return MergeflowError(f"{path}: {' '.join(what.split())}")


def open_index(path: str | os.PathLike, f: Any, format_name: str, format_version: int, what: str, keys: Sequence[str]) -> dict:
    """The validated JSON index of an open file (``f`` from ``safe_open``) of ``format_name``;
    ``what`` names the format in messages; ``keys`` must be present. ``index["offsets"]`` is the
    running sum of the entries' ``bytes`` (where each entry's payload starts)."""
    meta = f.metadata() or {}
    if meta.get("format") != format_name:
        raise fail(path, f"not a {format_name} file (format {meta.get('format')!r})")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) < 1:
        raise fail(path, f"invalid {what} format version {version!r}")
    if int(version) > format_version:
        raise fail(
            path, f"{what} format version {version} is newer than this mergeflow reads ({format_version}); upgrade mergeflow"
        )
    try:
        packed = f.get_tensor("index").numpy().tobytes()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise fail(path, f"{what} index unreadable ({e})") from None
    if meta.get("index_crc32") != str(zlib.crc32(packed)):
        raise fail(path, f"corrupt {what} index (checksum mismatch)")
    try:
        index = json.loads(zlib.decompress(packed))
        for key in keys:
            index[key]  # noqa: B018 - presence check
        index["offsets"] = np.cumsum([0] + [int(e["bytes"]) for e in index["tensors"]]).tolist()
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise fail(path, f"corrupt {what} index ({type(e).__name__}: {e})") from None
    return index


def read(path: str | os.PathLike, f: Any, index: dict, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One stored tensor, its checksum (and dtype, if given) verified."""
    try:
        t = f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise fail(path, f"tensor {key}: unreadable ({e})") from None
    if dtype is not None and t.dtype != dtype:
        raise fail(path, f"tensor {key}: dtype {t.dtype}, expected {dtype}")
    if zlib.crc32(raw(t)) != index["crc32"].get(key):
        raise fail(path, f"tensor {key}: checksum mismatch (corrupt file)")
    return t
