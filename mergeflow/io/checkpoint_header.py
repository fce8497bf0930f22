"""Reading and validating a safetensors header without reading tensor data (what ``Checkpoint``
does for every file up front)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint_format import MAX_HEADER_BYTES, ST_DTYPES, TensorInfo, _is_count, _one_line


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header, reading no tensor data.

    Checks what safetensors' ``safe_open`` checks (known dtypes, byte ranges matching shapes,
    ranges tiling the data without gaps or overlaps, the file size covering them exactly) and
    reports a failure as one line naming the file and, when known, the tensor.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MergeflowError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise MergeflowError(
                    f"{file}: not a safetensors file (header length {n} does not fit in the file's {size} bytes)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise MergeflowError(f"{file}: cannot read ({_one_line(exc)})") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise MergeflowError(f"{file}: invalid safetensors header JSON ({_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise MergeflowError(f"{file}: invalid safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in sorted(header.items()):
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(_is_count(x) for x in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MergeflowError(
                f"{file}: tensor {name} has an invalid header entry {_one_line(json.dumps(entry))[:120]}"
            ) from None
        if code not in ST_DTYPES:
            raise MergeflowError(f"{file}: tensor {name} has dtype {code}, which this torch cannot read")
        info = TensorInfo(file, ST_DTYPES[code], tuple(shape), base + begin, base + end)
        if end - begin != info.nbytes:
            raise MergeflowError(
                f"{file}: tensor {name} has data_offsets [{begin}, {end}] for shape {list(shape)} {code} ({info.nbytes} bytes)"
            )
        infos[name] = info
    expect = base
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != expect:
            raise MergeflowError(f"{file}: tensor {name} data overlaps another tensor or leaves a gap (corrupt header)")
        if info.end > size:
            raise MergeflowError(
                f"{file}: tensor {name} is cut short: its data ends at byte {info.end}, the file has {size} (truncated file)"
            )
        expect = info.end
    if expect != size:
        raise MergeflowError(f"{file}: {size - expect} stray bytes after the last tensor (corrupt file)")
    return infos
