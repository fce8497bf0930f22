"""Prefect tasks around the library's stage functions: caching by inputs, progress in the logs."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task

from mergeflow import stages
from mergeflow.params import Params
from tasks import cache


@task(name="stage", task_run_name="{stage}", cache_policy=None)
def run_stage(stage: str, p: Params, root: Path, code: str) -> dict:
    """Run one stage unless its inputs and outputs are unchanged since its last run.

    Returns ``{"stage", "cached", "seconds", "summary"}``.
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    if cache.is_fresh(p, root, stage, code):
        log.info("%s: cached (inputs and outputs unchanged), skipped", stage)
        summary = (cache.read_stamp(root, stage) or {}).get("summary", {})
        return {"stage": stage, "cached": True, "seconds": time.perf_counter() - t0, "summary": summary}
    cache.invalidate(root, stage)
    log.info("%s: running", stage)
    summary = getattr(stages, stage)(p, root, log=log.info)
    summary = summary if stage != "evaluate" else {"metrics": "artifacts/eval/metrics.json"}
    cache.write_stamp(p, root, stage, code, summary)
    seconds = time.perf_counter() - t0
    log.info("%s: done in %.1f s", stage, seconds)
    return {"stage": stage, "cached": False, "seconds": seconds, "summary": summary}
