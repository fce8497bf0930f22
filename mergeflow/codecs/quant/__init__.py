"""Quantised task vectors (TVQ / RTVQ, Kim et al., ICCV 2025) and their file, ``mergeflow.tvq``.

``arithmetic``: quantising (min-max per tensor, bit packing, the residual form, stored
sizes). ``files``: the file format, written and read whole; its kinds are ``per_task`` (one
task's quantised vector) and ``residual`` (a shared base plus per-task offsets). ``streaming``:
``QuantReader`` (one tensor at a time) and the writers from task-vector checkpoints.
Specification: docs/quant-format.md.
"""

from mergeflow.codecs.quant.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    PER_TASK,
    RESIDUAL,
    QuantStats,
    RTVQFile,
    TVQFile,
    load_rtvq,
    load_tvq,
    quant_stats,
    save_rtvq,
    save_tvq,
)
from mergeflow.codecs.quant.arithmetic import (
    MAX_BITS,
    MIN_BITS,
    RANGE_BYTES,
    RTVQ,
    QTensor,
    check_bits,
    dequantise,
    pack,
    qdq,
    quantise,
    rtvq_bytes,
    rtvq_dequantise,
    rtvq_qdq,
    rtvq_quantise,
    tvq_bytes,
    unpack,
)
from mergeflow.codecs.quant.streaming import QuantReader, QuantView, save_rtvq_from, save_tvq_from

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "MAX_BITS",
    "MIN_BITS",
    "PER_TASK",
    "RANGE_BYTES",
    "RESIDUAL",
    "RTVQ",
    "QTensor",
    "QuantReader",
    "QuantStats",
    "QuantView",
    "RTVQFile",
    "TVQFile",
    "check_bits",
    "dequantise",
    "load_rtvq",
    "load_tvq",
    "pack",
    "qdq",
    "quant_stats",
    "quantise",
    "rtvq_bytes",
    "rtvq_dequantise",
    "rtvq_qdq",
    "rtvq_quantise",
    "save_rtvq",
    "save_rtvq_from",
    "save_tvq",
    "save_tvq_from",
    "tvq_bytes",
    "unpack",
]
