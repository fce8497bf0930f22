"""Task vector quantisation, TVQ and RTVQ (Kim et al., ICCV 2025): any merge on quantised inputs.

Task vectors are quantised per tensor (asymmetric min-max, ``mergeflow.codecs.quant``), then
a static merge, named by ``merge`` with hyper-parameters ``options``, runs on the dequantised
vectors:

- ``tvq``: each tau_t at ``bits`` bits (default 4, the paper's headline precision).
- ``rtvq``: per tensor the mean of the task vectors at ``base_bits`` and each offset from the
  dequantised base at ``offset_bits`` (defaults 3 and 2, the paper's B3O2).

In memory (``qdq``: ``mergeflow merge`` and the API) or, in the pipeline's merge stage, from
the codes kept as files (``write_quantised``, the same merged model bit for bit). Refused as
``merge``: dynamic methods, CAT, the switch methods and tvq/rtvq themselves. Storage:
``storage_bytes(hp, n, n_tasks)`` and ``exact_storage`` (with the per-tensor min/max).
Details (storage formulas, the wrapped ``prepare``): docs/method-notes.md#tvq.
"""

from __future__ import annotations

from typing import Annotated, Any, Sequence

import torch

from mergeflow import methods
from mergeflow.codecs.quant import qdq, rtvq_bytes, rtvq_qdq, tvq_bytes
from mergeflow.errors import MergeflowError
from mergeflow.methods import Hp, MergeJob, Method, register

REFERENCE = "Kim et al., Task Vector Quantization for Memory-Efficient Model Merging, ICCV 2025"
TVQ_BITS = 4
RTVQ_BASE_BITS, RTVQ_OFFSET_BITS = 3, 2

Merge = Annotated[str, Hp("the (static) merge run on the dequantised task vectors")]
Options = Annotated[dict, Hp("hyper-parameters of the merge named by `merge`")]


def _bits(what: str) -> Hp:
    return Hp(f"{what} (per-tensor asymmetric min-max)", low=2, high=8)


def inner_method(name: str, where: str = "") -> Method:
    """The method ``merge`` names, if it can run on quantised task vectors; else a one-line error."""
    try:
        method = methods.get(name)
    except MergeflowError as e:
        raise MergeflowError(f"{where}merge: {e}") from None
    if method.write is not None or method.codec is not None:
        own = ", ".join(n for n in methods.names() if methods.get(n).write or methods.get(n).codec)
        raise MergeflowError(
            f"{where}merge: {name} cannot run on quantised task vectors ({own} compress task vectors themselves)"
        )
    if method.dynamic:
        raise MergeflowError(f"{where}merge: {name} is a dynamic method (a model per task); tvq and rtvq wrap static merges only")
    if method.needs is not None:
        raise MergeflowError(
            f"{where}merge: {name} needs {method.needs.replace('_', '-')} data, which tvq and rtvq do not pass on"
        )
    return method


def _validate(hp: dict, where: str) -> None:
    """Refuse a bad ``merge`` or ``options`` before any work; ``options`` becomes the inner
    method's full hyper-parameters (its defaults overlaid)."""
    hp["options"] = inner_method(hp["merge"], where).hyper(hp["options"], where=f"{where}options.")


def inner(hp: dict) -> tuple[Method, dict]:
    """The wrapped method and its full hyper-parameters, from tvq's or rtvq's."""
    method = inner_method(hp["merge"])
    return method, method.hyper(hp["options"])


def _wrapped_prepare(quantised):
    """``prepare`` of a wrapper whose task vectors are ``quantised(taus, hp)``."""

    def prepare(stream, hp: dict) -> Any:
        method, options = inner(hp)
        if method.prepare is None:
            return None

        def qstream():
            for name, base, taus in stream():
                yield name, base, quantised(taus, hp)

        return method.prepare(qstream, dict(options))

    return prepare


def _run(name, base, taus, hp: dict, ctx) -> Any:
    method, options = inner(hp)
    return method(name, base, taus, ctx=ctx, **options)


def _tvq_taus(taus, hp):
    return [qdq(t, hp["bits"]) for t in taus]


def _rtvq_taus(taus, hp):
    return rtvq_qdq(taus, hp["base_bits"], hp["offset_bits"])


def storage_bytes(hp: dict, n: int, n_tasks: int) -> int:
    """Bytes kept for ``n`` floating parameters per model and ``n_tasks`` tasks, given the
    full hyper-parameters of tvq (``bits``) or rtvq (``base_bits``, ``offset_bits``) as
    ``hyper`` returns them; the 8 bytes per stored tensor (its min and max) are not included."""
    if "base_bits" in hp:
        return (n * hp["base_bits"] + 7) // 8 + n_tasks * ((n * hp["offset_bits"] + 7) // 8)
    if "bits" in hp:
        return n_tasks * ((n * hp["bits"] + 7) // 8)
    raise MergeflowError("storage_bytes: hyper-parameters of tvq (bits) or rtvq (base_bits, offset_bits) expected")


def exact_storage(hp: dict, n: int, n_tasks: int, shapes: dict | None) -> int:
    """``storage_bytes`` plus the 8 bytes (min and max) of every stored tensor when the
    floating tensors' shapes are known (the pipeline passes them): the codec files' payload."""
    if shapes is None:
        return storage_bytes(hp, n, n_tasks)
    import math

    numels = [math.prod(s) for s in shapes.values()]
    if "base_bits" in hp:
        return sum(rtvq_bytes(k, n_tasks, hp["base_bits"], hp["offset_bits"]) for k in numels)
    return n_tasks * sum(tvq_bytes(k, hp["bits"]) for k in numels)


@register(
    "tvq",
    reference=REFERENCE,
    prepare=_wrapped_prepare(_tvq_taus),
    storage=lambda n, n_tasks, itemsize, hp=None, shapes=None: exact_storage(hp or {"bits": TVQ_BITS}, n, n_tasks, shapes),
    validate=_validate,
    write=lambda method, job: write_quantised(method, job),
)
def tvq(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    bits: Annotated[int, _bits("bits per task-vector entry")] = TVQ_BITS,
    merge: Merge = "task_arithmetic",
    options: Options = {},  # copied per call by hyper()
    ctx: Any = None,
) -> torch.Tensor:
    """Any static merge on task vectors quantised per tensor to `bits` bits (TVQ)."""
    hp = {"bits": bits, "merge": merge, "options": options}
    return _run(name, base, _tvq_taus(taus, hp), hp, ctx)


@register(
    "rtvq",
    reference=REFERENCE,
    prepare=_wrapped_prepare(_rtvq_taus),
    storage=lambda n, n_tasks, itemsize, hp=None, shapes=None: exact_storage(
        hp or {"base_bits": RTVQ_BASE_BITS, "offset_bits": RTVQ_OFFSET_BITS}, n, n_tasks, shapes
    ),
    validate=_validate,
    write=lambda method, job: write_quantised(method, job),
)
def rtvq(
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    *,
    base_bits: Annotated[int, _bits("bits of the shared base vector (mean of the task vectors)")] = RTVQ_BASE_BITS,
    offset_bits: Annotated[int, _bits("bits of each task's offset from the dequantised base")] = RTVQ_OFFSET_BITS,
    merge: Merge = "task_arithmetic",
    options: Options = {},  # copied per call by hyper()
    ctx: Any = None,
) -> torch.Tensor:
    """Any static merge on residually quantised task vectors: base^ + offset_t^ (RTVQ)."""
    hp = {"base_bits": base_bits, "offset_bits": offset_bits, "merge": merge, "options": options}
    return _run(name, base, _rtvq_taus(taus, hp), hp, ctx)


def write_quantised(method: Method, job: MergeJob) -> tuple[int, dict]:
    """The pipeline's TVQ / RTVQ: the task vectors quantised into files (``dst/codes``: one
    ``<task>.tvq`` per task, or one ``tasks.rtvq``); the wrapped merge reads its task vectors back
    from those files one tensor at a time. Storage is the files' payload."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from mergeflow.codecs.quant import QuantReader, save_rtvq_from, save_tvq_from
    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.merge import TaskVectors

    hp, tasks, dst = job.hp, job.tasks, job.dst
    vectors = [Checkpoint(job.vector(t)) for t in tasks]
    codes = Path(tempfile.mkdtemp(prefix=f".{method.name}-codes.", suffix=".tmp", dir=dst.parent))
    try:
        if "bits" in hp:
            stats = save_tvq_from(vectors, hp["bits"], codes, tasks)
            views = [QuantReader(codes / f"{t}.tvq").task() for t in tasks]
        else:
            stats = [
                save_rtvq_from(vectors, hp["base_bits"], hp["offset_bits"], codes / "tasks.rtvq", {"tasks": ",".join(tasks)})
            ]
            reader = QuantReader(codes / "tasks.rtvq")
            views = [reader.task(i) for i in range(len(tasks))]
        wrapped, options = inner(hp)
        job.merge(wrapped, [TaskVectors(job.base, v, True) for v in views], options)
        os.replace(codes, dst / "codes")
    finally:
        shutil.rmtree(codes, ignore_errors=True)
    storage = sum(st.payload_bytes for st in stats)
    return storage, {
        "store": "checkpoint",
        "codes": sorted(f.name for f in (dst / "codes").iterdir()),
        "codes_file_bytes": sum(st.file_bytes for st in stats),
        **hp,
    }
