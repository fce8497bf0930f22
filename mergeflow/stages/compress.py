"""compress: every task vector in ``compress.method``'s compact form (T-Switch's binary switch
files), and the Auto-Switch query set beside them."""

from __future__ import annotations

from pathlib import Path

from mergeflow.codecs.switch import save_switch
from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import write_json
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import resolve_device
from mergeflow import methods
from mergeflow.params import Params
from mergeflow.stages.layout import QUERIES_NAME, SWITCH_SUFFIX, Layout, Log, family_of, noop, require, tasks_of
from mergeflow.stages.units import Map, run_stage_units

QUERIES_UNIT = "queries"  # the compress unit that builds Auto-Switch's query set


def run(p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """T-Switch every task vector and store it in the binary switch format; Auto-Switch's query set beside."""
    return run_stage_units("compress", p, root, log, map_units)


def unit_names(p: Params, lay: Layout) -> list[str]:
    return [*tasks_of(p, lay), QUERIES_UNIT]


def run_unit(p: Params, lay: Layout, unit: str, work: Path, log: Log) -> dict:
    if unit == QUERIES_UNIT:
        fam = family_of(lay, resolve_device(p.device), p.evaluate.batch_size)
        lacking = [t for t in tasks_of(p, lay) if not fam.has_split(t, "train")]
        if lacking:  # Auto-Switch then refuses, naming this; every other method runs
            log(f"compress: no Auto-Switch query set: task {lacking[0]} has no train split ({lay.data / lacking[0]})")
            return {"bytes": 0, "lacking": lacking}
        queries = build_queries(p, lay)
        queries.save(work / QUERIES_NAME)
        log(f"compress: Auto-Switch query set: {p.compress.queries} per task, {queries.nbytes:,} bytes")
        return {"bytes": queries.nbytes}
    task = unit
    vec = Checkpoint(require(lay.vectors / f"{task}.safetensors", "extract"))
    codec = methods.get(p.compress.method).codec
    assert codec is not None  # params validate that compress.method has a codec
    switch = codec(vec.items(), p.compress.drop, metadata={"task": task})
    st = save_switch(work / f"{task}{SWITCH_SUFFIX}", switch, encoding=p.compress.encoding)
    n = sum(t.numel() for _, t in vec.items())
    stats = {
        "bits_per_param": st.bits_per_param,
        "entropy_floor_bits": st.entropy_floor_bits,
        "keep_fraction": st.n_kept / max(st.n_params, 1),
        "file_bytes": st.file_bytes,
        "float32_bytes": 4 * n,
        "ratio_to_float32": st.file_bytes / (4 * n),
    }
    log(
        f"compress: {task}: {st.bits_per_param:.3f} bits/param (floor {st.entropy_floor_bits:.3f}), "
        f"{st.file_bytes:,} bytes = {stats['ratio_to_float32']:.4f} of float32"
    )
    return stats


def finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    stats = {t: r for t, r in results.items() if t != QUERIES_UNIT}
    write_json(work / "stats.json", {"drop": p.compress.drop, "encoding": p.compress.encoding, "tasks": stats})
    return stats


def build_queries(p: Params, lay: "Layout"):
    """Auto-Switch's query set: ``compress.queries`` train rows per task, embedded by the base."""
    from mergeflow.autoswitch import query_rows, sample_queries

    base = Checkpoint(require(lay.checkpoints / "base", "download"))
    fam = family_of(lay, resolve_device(p.device), p.evaluate.batch_size)
    model = fam.build(base.state_dict())
    train = {}
    for i, task in enumerate(tasks_of(p, lay)):
        data = fam.load_data(task, "train")
        if len(data) == 0:
            raise MergeflowError(f"{lay.data / task}: no train rows for Auto-Switch's query set")
        train[task] = fam.features(model, data, query_rows(len(data), p.compress.queries, p.seed, i))
    return sample_queries(train, p.compress.queries, seed=p.seed)
