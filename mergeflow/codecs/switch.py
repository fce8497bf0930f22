"""The binary task switch container: one task's T-Switch as a compact safetensors file.

Per binarised tensor the switch holds a ternary B in {-1, 0, +1} and one float32 scale s;
dense tensors (0-dim, per-task heads) are stored as they are and all-zero tensors only by
name. B is stored in one of two encodings, chosen per tensor (``auto``: the smaller):

- ``bitmap``: a keep bit per parameter, then a sign bit per kept entry: 1 + q bits/param.
- ``ans``: the ternary symbols entropy-coded with rANS (``constriction``) under the tensor's
  own symbol frequencies: about H(q) + q bits/param, the floor for a keep fraction q.

The container: metadata ``format``, ``format_version``, ``index_crc32``; tensors ``index``
(the zlib-compressed JSON index), ``payload``, ``scales`` and ``dense/<name>``. The index holds
a CRC-32 of every stored tensor, so a corrupt file fails loudly on load.
The bytes, sizes, versions and a worked example: docs/switch-format.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import constriction
import numpy as np
import torch
from safetensors import safe_open

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.codecs._container import fail as _fail, open_index, read as _read, write

FORMAT_NAME = "mergeflow.switch"
FORMAT_VERSION = 1
SWITCH_SUFFIX = ".switch.safetensors"  # how the pipeline names a task's switch file
ENCODINGS = ("bitmap", "ans")
Encoding = Literal["auto", "bitmap", "ans"]

_SCALE_BITS = 32  # each binarised tensor's float32 scale, counted in the payload
_ANS_CHUNK = 1 << 24  # symbols per encode/decode call: bounds the int32 symbol buffer


@dataclass
class SwitchTensor:
    """One binarised tensor: ``ternary`` (int8 in {-1, 0, +1}, the tensor's shape) and ``scale``."""

    ternary: torch.Tensor
    scale: float


@dataclass
class Switch:
    """One task's switch: binarised tensors, dense tensors, skipped names, string metadata."""

    tensors: dict[str, SwitchTensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The task's update of a binarised tensor, scale * ternary, computed in float32."""
        t = self.tensors[name]
        return (t.ternary.to(torch.float32) * t.scale).to(dtype)


@dataclass
class SwitchStats:
    """Storage figures of a switch file (bits count the binarised tensors only).

    ``payload_bytes`` is the encoded bitmap/ANS bytes plus 4 bytes per scale;
    ``bits_per_param`` = 8 * payload_bytes / n_params; ``entropy_floor_bits`` the mean of
    H(q_t) + q_t over parameters; ``per_tensor`` maps a name to (encoding, payload bits
    including its 32-bit scale), so those bits sum to 8 * payload_bytes.
    """

    n_params: int
    n_kept: int
    payload_bytes: int
    file_bytes: int
    bits_per_param: float
    entropy_floor_bits: float
    per_tensor: dict[str, tuple[str, int]]


# --- the two encodings -------------------------------------------------------------------


def _bitmap_encode(flat: np.ndarray) -> bytes:
    """Keep bits (one per element) then sign bits (one per kept element, 1 = negative),
    each packed little-endian within bytes and zero-padded to a whole byte."""
    keep = flat != 0
    return np.packbits(keep, bitorder="little").tobytes() + np.packbits(flat[keep] < 0, bitorder="little").tobytes()


def _bitmap_decode(payload: np.ndarray, n: int, n_kept: int) -> np.ndarray:
    n_mask = (n + 7) // 8
    if payload.size != n_mask + (n_kept + 7) // 8:
        raise ValueError(f"bitmap payload has {payload.size} bytes, expected {n_mask + (n_kept + 7) // 8}")
    keep_bits = np.unpackbits(payload[:n_mask], bitorder="little")
    sign_bits = np.unpackbits(payload[n_mask:], bitorder="little")
    if keep_bits[n:].any() or sign_bits[n_kept:].any():
        raise ValueError("bitmap padding bits are not zero")
    keep = keep_bits[:n].view(bool)
    if int(keep.sum()) != n_kept:
        raise ValueError(f"bitmap keeps {int(keep.sum())} entries, the index says {n_kept}")
    out = np.zeros(n, dtype=np.int8)
    out[keep] = 1 - 2 * sign_bits[:n_kept].astype(np.int8)
    return out


def _ans_model(counts: list[int]) -> Any:
    """The categorical model over symbols 0, 1, 2 (= B + 1) from exact symbol counts.

    constriction quantises it to 24-bit fixed point, giving every symbol (even an absent one)
    a non-zero probability, so any symbol that occurs can be coded."""
    return constriction.stream.model.Categorical(np.asarray(counts, dtype=np.float64), perfect=False)


def _ans_encode(flat: np.ndarray, counts: list[int]) -> bytes:
    """rANS words (uint32, little-endian) such that decoding yields the symbols in order."""
    coder, model = constriction.stream.stack.AnsCoder(), _ans_model(counts)
    for start in reversed(range(0, flat.size, _ANS_CHUNK)):  # a stack: encode the end first
        coder.encode_reverse(flat[start : start + _ANS_CHUNK].astype(np.int32) + 1, model)
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decode(payload: np.ndarray, n: int, counts: list[int]) -> np.ndarray:
    if payload.size % 4:
        raise ValueError(f"ans payload has {payload.size} bytes, not a whole number of 32-bit words")
    coder, model = constriction.stream.stack.AnsCoder(payload.view("<u4").astype(np.uint32)), _ans_model(counts)
    parts = [coder.decode(model, min(_ANS_CHUNK, n - start)) for start in range(0, n, _ANS_CHUNK)]
    if not coder.is_empty():
        raise ValueError("ans payload has words left over after the last symbol")
    out = (np.concatenate(parts) if parts else np.zeros(0, np.int32)) - 1
    if _counts(out) != counts:
        raise ValueError("ans payload decodes to other symbol counts than the index says")
    return out.astype(np.int8)


def _counts(flat: np.ndarray) -> list[int]:
    """[count of -1, count of 0, count of +1]."""
    return np.bincount(flat.astype(np.int64) + 1, minlength=3).tolist()


# --- writing -------------------------------------------------------------------------------


def _ternary_numpy(name: str, t: SwitchTensor) -> np.ndarray:
    """The flattened (row-major) int8 ternary, after checking it."""
    if not isinstance(t.ternary, torch.Tensor) or t.ternary.dtype != torch.int8:
        got = getattr(t.ternary, "dtype", type(t.ternary).__name__)
        raise MergeflowError(f"switch tensor {name}: ternary must be an int8 tensor, got {got}")
    flat = t.ternary.detach().cpu().contiguous().reshape(-1).numpy()
    if flat.size and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise MergeflowError(f"switch tensor {name}: ternary values must be -1, 0 or +1")
    return flat


def _encode(name: str, t: SwitchTensor, encoding: Encoding) -> tuple[dict, bytes]:
    """(index entry, payload) of one binarised tensor in the requested or smallest encoding."""
    if not math.isfinite(float(t.scale)):
        raise MergeflowError(f"switch tensor {name}: scale {t.scale} is not finite")
    flat = _ternary_numpy(name, t)
    counts = _counts(flat)
    options = {}
    if encoding in ("auto", "bitmap"):
        options["bitmap"] = _bitmap_encode(flat)
    if encoding in ("auto", "ans"):
        options["ans"] = _ans_encode(flat, counts)
    chosen = min(options, key=lambda e: len(options[e]))  # ties: bitmap, the faster to decode
    entry = {"name": name, "shape": list(t.ternary.shape), "encoding": chosen, "counts": counts}
    return entry, options[chosen]


def _check_switch(switch: Switch) -> None:
    groups = {"binarised": switch.tensors.keys(), "dense": switch.dense.keys(), "skipped": switch.skipped}
    seen: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            if not isinstance(name, str):
                raise MergeflowError(f"switch tensor name {name!r} is not a string")
            if name in seen:
                raise MergeflowError(f"switch tensor {name} is listed as both {seen[name]} and {group}")
            seen[name] = group
    for name, d in switch.dense.items():
        if not isinstance(d, torch.Tensor):
            raise MergeflowError(f"switch dense tensor {name}: expected a torch.Tensor, got {type(d).__name__}")
    for key, value in switch.metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MergeflowError(f"switch metadata {key!r}: keys and values must be strings, got {type(value).__name__}")


def save_switch(path: str | os.PathLike, switch: Switch, encoding: Encoding = "auto") -> SwitchStats:
    """Write ``switch`` to ``path`` atomically (temporary file, fsync, rename) and return its stats.

    ``encoding`` picks the ternary encoding of every tensor: "bitmap", "ans" or "auto" (the
    smaller of the two per tensor). Bad input raises MergeflowError before anything is written.
    """
    if encoding not in ("auto", *ENCODINGS):
        raise MergeflowError(f"switch encoding {encoding!r}: not one of auto, bitmap, ans")
    _check_switch(switch)
    entries, payloads = [], []
    for name, t in switch.tensors.items():
        entry, payload = _encode(name, t, encoding)
        entry["bytes"] = len(payload)
        entries.append(entry)
        payloads.append(payload)
    stored = {
        "payload": torch.from_numpy(np.frombuffer(b"".join(payloads), dtype=np.uint8).copy()),
        "scales": torch.tensor([t.scale for t in switch.tensors.values()], dtype=torch.float32),
    }
    for name, d in switch.dense.items():
        stored[f"dense/{name}"] = d.detach().cpu().contiguous()
    index = {
        "tensors": entries,
        "dense": list(switch.dense),
        "skipped": list(switch.skipped),
        "metadata": dict(switch.metadata),
        "writer": f"mergeflow {__version__}, constriction {version('constriction')}",
    }
    write(path, stored, index, FORMAT_NAME, FORMAT_VERSION)
    return _stats(entries, os.path.getsize(path))


# --- reading -------------------------------------------------------------------------------


def _open_index(path: str | os.PathLike, f: Any) -> dict:
    """The validated JSON index of an open switch file."""
    return open_index(path, f, FORMAT_NAME, FORMAT_VERSION, "switch", ("tensors", "dense", "skipped", "metadata", "crc32"))


def _decode(entry: dict, payload: np.ndarray) -> np.ndarray:
    """The flat int8 ternary of one index entry and its payload."""
    n, counts = math.prod(entry["shape"]), entry["counts"]
    if entry["encoding"] == "bitmap":
        return _bitmap_decode(payload, n, n - counts[1])
    if entry["encoding"] == "ans":
        return _ans_decode(payload, n, counts)
    raise ValueError(f"unknown encoding {entry['encoding']!r}")


def load_switch(path: str | os.PathLike) -> Switch:
    """Read a switch file; a bad, corrupt, truncated or too-new file raises MergeflowError."""
    try:
        with safe_open(path, framework="pt") as f:
            index = _open_index(path, f)
            scales = _read(path, f, index, "scales", torch.float32)
            if scales.numel() != len(index["tensors"]):
                raise _fail(path, f"{scales.numel()} scales for {len(index['tensors'])} binarised tensors")
            payloads = _read(path, f, index, "payload", torch.uint8).numpy()
            if payloads.size != index["offsets"][-1]:
                raise _fail(path, f"payload has {payloads.size} bytes, the index says {index['offsets'][-1]}")
            tensors = {}
            for i, (entry, scale) in enumerate(zip(index["tensors"], scales.tolist())):
                name = entry["name"]
                payload = payloads[index["offsets"][i] : index["offsets"][i + 1]]
                try:
                    flat = _decode(entry, payload)
                except (KeyError, TypeError, ValueError) as e:
                    raise _fail(path, f"tensor {name}: cannot decode ({type(e).__name__}: {e})") from None
                tensors[name] = SwitchTensor(torch.from_numpy(flat).reshape(entry["shape"]), scale)
            dense = {name: _read(path, f, index, f"dense/{name}") for name in index["dense"]}
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
        raise _fail(path, f"not a readable switch file ({type(e).__name__}: {e})") from None
    return Switch(tensors=tensors, dense=dense, skipped=list(index["skipped"]), metadata=dict(index["metadata"]))


# --- statistics ----------------------------------------------------------------------------


def _binary_entropy(q: float) -> float:
    return 0.0 if q <= 0 or q >= 1 else -(q * math.log2(q) + (1 - q) * math.log2(1 - q))


def _stats(entries: list[dict], file_bytes: int) -> SwitchStats:
    n_params = n_kept = 0
    floor = 0.0
    per_tensor = {}
    for entry in entries:
        name, n = entry["name"], math.prod(entry["shape"])
        kept = n - entry["counts"][1]
        n_params, n_kept = n_params + n, n_kept + kept
        floor += n * (_binary_entropy(kept / n) + kept / n) if n else 0.0
        per_tensor[name] = (entry["encoding"], 8 * int(entry["bytes"]) + _SCALE_BITS)
    payload = sum(bits for _, bits in per_tensor.values()) // 8
    return SwitchStats(
        n_params=n_params,
        n_kept=n_kept,
        payload_bytes=payload,
        file_bytes=file_bytes,
        bits_per_param=8 * payload / n_params if n_params else 0.0,
        entropy_floor_bits=floor / n_params if n_params else 0.0,
        per_tensor=per_tensor,
    )


def switch_stats(path: str | os.PathLike) -> SwitchStats:
    """The storage figures of a switch file, read from its header (nothing is decoded)."""
    try:
        with safe_open(path, framework="pt") as f:
            index = _open_index(path, f)
            return _stats(index["tensors"], Path(path).stat().st_size)
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
        raise _fail(path, f"not a readable switch file ({type(e).__name__}: {e})") from None
