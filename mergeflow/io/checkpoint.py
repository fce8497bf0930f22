"""Lazy, tensor-by-tensor checkpoint access in Hugging Face layout, and atomic checkpoint writes.

A checkpoint reference is a directory (``config.json`` + ``model.safetensors``, or sharded
``*.safetensors`` with ``model.safetensors.index.json``) or a single ``.safetensors`` file.
Tensors are read one at a time through safetensors' lazy ``safe_open``: memory grows with the
largest tensor, never with the model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir, atomic_file

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Checkpoint:
    """Read-only lazy view of a checkpoint: ``names``, ``shape``, ``dtype``, ``get``."""

    def __init__(self, ref: str | Path):
        self.path = Path(ref)
        if not self.path.exists():
            raise MergeflowError(f"checkpoint not found: {self.path}")
        self._files: dict[str, Path] = {}  # tensor name -> shard file
        self.config_path: Path | None = None
        if self.path.is_file():
            self._add_file(self.path)
        else:
            index = self.path / INDEX_NAME
            if (self.path / "config.json").exists():
                self.config_path = self.path / "config.json"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as exc:
                    raise MergeflowError(f"{index}: not a valid safetensors index ({exc})") from None
                for shard in sorted(set(weight_map.values())):
                    self._add_file(self.path / shard)
                missing = set(weight_map) - set(self._files)
                if missing:
                    raise MergeflowError(f"{index}: tensor {sorted(missing)[0]} listed but not in its shard")
            elif (self.path / WEIGHTS_NAME).exists():
                self._add_file(self.path / WEIGHTS_NAME)
            else:
                raise MergeflowError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME} in checkpoint directory")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def _add_file(self, file: Path) -> None:
        if not file.exists():
            raise MergeflowError(f"checkpoint file not found: {file}")
        try:
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    self._files[name] = file
        except (SafetensorError, OSError, ValueError) as exc:
            raise MergeflowError(f"{file}: corrupt or truncated safetensors file ({_one_line(exc)})") from None

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def _slice_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            with safe_open(self._file(name), framework="pt") as fh:
                sl = fh.get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._slice_meta(name)[0]

    def _file(self, name: str) -> Path:
        try:
            return self._files[name]
        except KeyError:
            raise MergeflowError(f"{self.path}: tensor {name} not in checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        file = self._file(name)
        try:
            with safe_open(file, framework="pt") as fh:
                return fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MergeflowError(f"{file}: cannot read tensor {name} ({_one_line(exc)})") from None

    def items(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def dtype(self) -> torch.dtype:
        """The dominant floating dtype of the checkpoint (what merged outputs are written in)."""
        counts: dict[str, int] = {}
        for name in self.names():
            shape, dt = self._slice_meta(name)
            counts[dt] = counts.get(dt, 0) + int(torch.Size(shape).numel())
        floats = {k: v for k, v in counts.items() if k in ("F32", "F16", "BF16", "F64")}
        top = max(floats or counts, key=(floats or counts).get)
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(top, torch.float32)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def check_compatible(base: Checkpoint, other: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Same tensor names and shapes as the base, or a one-line error naming the first difference."""
    want = set(base.names() if names is None else names)
    have = set(other.names())
    if missing := sorted(want - have):
        raise MergeflowError(f"{other.path}: tensor {missing[0]} of the base is missing")
    if names is None and (extra := sorted(have - want)):
        raise MergeflowError(f"{other.path}: tensor {extra[0]} is not in the base {base.path}")
    for name in sorted(want):
        if base.shape(name) != other.shape(name):
            raise MergeflowError(
                f"{other.path}: tensor {name} has shape {list(other.shape(name))}, base has {list(base.shape(name))}"
            )


def check_finite(name: str, tensor: torch.Tensor, source: Path | str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        kind = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise MergeflowError(f"{source}: tensor {name} contains {kind}")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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
