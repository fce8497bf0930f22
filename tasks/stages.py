"""Prefect tasks around the library's stage functions: caching by inputs, progress in the logs,
and each stage's units (per task, per method, per evaluated model) fanned out through the flow's
task runner (threads, or a Dask cluster)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task

from mergeflow import stages
from mergeflow.io.atomic import atomic_dir
from mergeflow.params import Params
from tasks import cache


def _cached(stage: str, p: Params, root: Path, log, t0: float) -> dict | None:
    if not cache.is_fresh(p, root, stage):
        return None
    log.info("%s: cached (inputs and outputs unchanged), skipped", stage)
    summary = (cache.read_stamp(root, stage) or {}).get("summary", {})
    return {"stage": stage, "cached": True, "seconds": time.perf_counter() - t0, "summary": summary}


def _done(stage: str, p: Params, root: Path, summary: dict, log, t0: float) -> dict:
    summary = summary if stage != "evaluate" else {"metrics": "artifacts/eval/metrics.json"}
    cache.write_stamp(p, root, stage, summary)
    seconds = time.perf_counter() - t0
    log.info("%s: done in %.1f s", stage, seconds)
    return {"stage": stage, "cached": False, "seconds": seconds, "summary": summary}


@task(name="stage", task_run_name="{stage}", cache_policy=None)
def run_stage(stage: str, p: Params, root: Path) -> dict:
    """Run one whole stage in this process unless its inputs and outputs are unchanged since its
    last run. Returns ``{"stage", "cached", "seconds", "summary"}``."""
    log = get_run_logger()
    t0 = time.perf_counter()
    if (hit := _cached(stage, p, root, log, t0)) is not None:
        return hit
    cache.invalidate(root, stage)
    log.info("%s: running", stage)
    return _done(stage, p, root, stages.run(stage, p, root, log=log.info), log, t0)


@task(name="unit", task_run_name="{stage}:{unit}", cache_policy=None)
def run_unit(stage: str, p: Params, root: str, unit: str, work: str) -> dict:
    """One unit of a stage (a task's vector or switch, a method's merge, a model's evaluation)."""
    log = get_run_logger()
    return stages.run_unit(stage, p, Path(root), unit, Path(work), log=log.info)


def run_stage_fanned(stage: str, p: Params, root: Path) -> dict:
    """Like ``run_stage``, called from the flow: the stage's units are submitted to the flow's task
    runner at once and assembled when all are done; the output folder is replaced whole."""
    log = get_run_logger()
    t0 = time.perf_counter()
    if (hit := _cached(stage, p, root, log, t0)) is not None:
        return hit
    cache.invalidate(root, stage)
    if stage == "download":
        log.info("%s: running", stage)
        return _done(stage, p, root, stages.run("download", p, root, log=log.info), log, t0)
    names = stages.units(stage, p, root)
    log.info("%s: running %d units (%s)", stage, len(names), ", ".join(names))
    with atomic_dir(stages.Layout(root).outs(stage)[0], kind=f"stage:{stage}") as work:
        futures = [run_unit.submit(stage, p, str(root), u, str(work)) for u in names]
        results = {u: f.result() for u, f in zip(names, futures)}
        summary = stages.finish(stage, p, root, work, results, log=log.info)
    return _done(stage, p, root, summary, log, t0)
