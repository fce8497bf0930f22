"""extract: the task vectors tau_t = theta_t - theta_0 of every task, as float32 safetensors."""

from __future__ import annotations

from pathlib import Path

from mergeflow.io.checkpoint import Checkpoint
from mergeflow.params import Params
from mergeflow.stages.layout import Layout, Log, noop, require, tasks_of
from mergeflow.stages.units import Map, run_stage_units
from mergeflow.vectors import extract_task_vector


def run(p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """Task vectors tau_t = theta_t - theta_0 for every task, as float32 safetensors."""
    return run_stage_units("extract", p, root, log, map_units)


def unit_names(p: Params, lay: Layout) -> list[str]:
    return tasks_of(p, lay)


def run_unit(p: Params, lay: Layout, task: str, work: Path, log: Log) -> dict:
    base = Checkpoint(require(lay.checkpoints / "base", "download"))
    n = extract_task_vector(base, Checkpoint(lay.checkpoints / task), work / f"{task}.safetensors", {"task": task})
    log(f"extract: {task}: {n:,} parameters")
    return {"n_params": n}


def finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    return {"n_params": {t: r["n_params"] for t, r in results.items()}}
