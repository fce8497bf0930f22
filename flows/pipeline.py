"""The pipeline flow: download -> extract -> compress -> merge -> evaluate, then DVC and MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from mergeflow.io.lock import clean_stale, workspace_lock  # noqa: E402
from mergeflow.params import Params  # noqa: E402
from mergeflow.stages import STAGES, Layout  # noqa: E402
from tasks import cache  # noqa: E402
from tasks.stages import run_stage_fanned  # noqa: E402
from tasks.track import log_run  # noqa: E402
from tasks.version import dvc_commit, dvc_push, git_commit  # noqa: E402

WORKERS = max(1, min(2, os.cpu_count() or 1))  # the default thread runner is unbounded: cap it


def task_runner(p: Params):
    """The task runner params ask for: threads (capped to the machine), or Dask through prefect-dask
    (an existing scheduler at ``run.dask_address``, else a LocalCluster on 127.0.0.1)."""
    if p.run.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=p.run.workers or WORKERS)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        from mergeflow.errors import MergeflowError

        raise MergeflowError("params: run.task_runner: dask needs prefect-dask (pip install 'mergeflow[dask]')") from None
    if p.run.dask_address:
        return DaskTaskRunner(address=p.run.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": p.run.workers or WORKERS,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        }
    )


def run_pipeline(p: Params, root: str, track: bool = True) -> dict:
    """The pipeline flow with the task runner of ``p.run``."""
    return pipeline.with_options(task_runner=task_runner(p))(p, root, track=track)


@flow(name="mergeflow-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
def pipeline(p: Params, root: str, track: bool = True) -> dict:
    """Run every stage (each skipped when its inputs are unchanged), commit to DVC, log to MLflow."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    with workspace_lock(root_path, p.run.lock, p.run.lock_timeout, log.info):  # one run per workspace
        if stale := clean_stale(Layout(root_path).artifacts):
            log.info("removed %d leftovers of an interrupted run (%s)", len(stale), ", ".join(x.name for x in stale[:3]))
        code = cache.code_digest()
        runs = []
        for i, stage in enumerate(STAGES, 1):
            log.info("stage %d/%d: %s", i, len(STAGES), stage)
            if stage in p.run.gpu.stages:  # a deployment on the GPU work pool runs it (flows/remote.py)
                from flows.remote import run_on_pool

                runs.append(run_on_pool(stage, p, root_path, code))
            else:
                runs.append(run_stage_fanned(stage, p, root_path))
        if all(r["cached"] for r in runs):
            log.info("nothing changed upstream or in params: every stage skipped")
        metrics = json.loads((Layout(root_path).eval / "metrics.json").read_text())
        lock = dvc_commit(root_path)
        if p.run.dvc_remote and lock is not None:
            dvc_push(root_path, p.run.dvc_remote)
        run_id = None
        if track:
            run_id = log_run(
                p,
                root_path,
                metrics,
                runs,
                {"git_commit": git_commit(root_path), "dvc_lock_sha256": lock, "mergeflow.experiment": p.experiment},
            )
    return {"metrics": metrics, "stages": runs, "mlflow_run_id": run_id, "dvc_lock_sha256": lock}
