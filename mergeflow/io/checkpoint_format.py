"""Checkpoint formats: the file names of a Hugging Face checkpoint folder, the dtype tables
(``DTYPES`` by name, ``ST_DTYPES`` by safetensors code) and ``TensorInfo``, where one tensor lives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # a PEFT adapter folder (LoRA factors)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# safetensors dtype codes -> torch dtypes (those this torch has; sub-byte formats are left out).
ST_DTYPES: dict[str, torch.dtype] = {
    code: dt
    for code, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        "C64": torch.complex64,
    }.items()
    if dt is not None
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and (safetensors only) absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = -1  # -1: a torch (.bin/.pt) file, read through torch.load
    end: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())[:300]
