"""Writing safetensors files and checkpoints atomically, with canonical headers (same inputs,
same bytes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors.torch import save_file

from mergeflow.io.atomic import atomic_dir, atomic_file
from mergeflow.io.checkpoint_format import WEIGHTS_NAME

if TYPE_CHECKING:
    from mergeflow.io.checkpoint import Checkpoint


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically, with a canonical header (same inputs, same bytes)."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        canonical_header(tmp)


def canonical_header(file: str | Path) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted.

    safetensors' writer puts ``__metadata__`` keys in hash-map order, which changes from one
    process to the next, so identical content would give different bytes (and DVC hashes). The
    header keeps its length (the same JSON, reordered; spaces pad as the format allows)."""
    with open(file, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # cannot happen for a header safetensors wrote: keep the file as it is
            return
        fh.seek(8)
        fh.write(raw + b" " * (n - len(raw)))


def write_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    like: Checkpoint | None = None,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint in Hugging Face layout (config.json copied from ``like``), atomically.

    Floating tensors are cast to ``dtype`` (default: the dtype of ``like``); others keep theirs.
    """
    out_dir = Path(out_dir)
    dtype = dtype or (like.dtype() if like is not None else None)
    with atomic_dir(out_dir) as tmp:
        cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(cast, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if like is not None and like.config_path is not None:
            shutil.copyfile(like.config_path, tmp / "config.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
