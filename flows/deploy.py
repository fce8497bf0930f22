"""Deployments: the pipeline on a schedule, and the stage flow on the GPU work pool.

``mergeflow deploy`` registers, on the Prefect server at ``run.prefect_api_url`` (else
``$PREFECT_API_URL``), with Prefect's own ``flow.from_source(<this checkout>).deploy(...)``:

* ``mergeflow-run/<name>``: the flow below on the work pool ``--pool`` (default ``mergeflow``), with
  the params file's absolute path as its parameter and the ``--cron`` schedule. Each run reads and
  validates the params file as it is then, exactly as ``mergeflow run --params FILE`` does.
* ``mergeflow-stage/<run.gpu.pool>``: the stage flow of ``flows/remote.py`` on the GPU pool, which
  the pipeline calls for every stage in ``run.gpu.stages``.

Both pools are created as process pools when missing; workers run the flow runs, the server's
scheduler creates the scheduled ones. ``mergeflow serve`` instead serves ``mergeflow-run/<name>``
from the foreground process (``flow.serve``). Details: docs/team.md, sections 2 and 3.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402

from mergeflow.errors import MergeflowError  # noqa: E402
from mergeflow.params import Params, load_params  # noqa: E402

SOURCE = Path(__file__).resolve().parents[1]  # this checkout: the deployments' source directory
RUN_FLOW = "mergeflow-run"
RUN_ENTRYPOINT = "flows/deploy.py:scheduled_run"
DEFAULT_POOL = "mergeflow"


@flow(name=RUN_FLOW, persist_result=False)
def scheduled_run(params: str, track: bool = True) -> dict:
    """``mergeflow run --params FILE`` as a deployable flow: the params file (an absolute path) is read
    and validated when the run starts; the workspace is its folder. Runs the pipeline flow as a subflow."""
    from flows.pipeline import run_pipeline

    path = Path(params)
    p = load_params(path)
    result = run_pipeline(p, str(path.resolve().parent), track=track)
    return {k: result[k] for k in ("stages", "mlflow_run_id", "dvc_lock_sha256")}


def api_url(p: Params) -> str:
    from prefect.settings import PREFECT_API_URL

    url = p.run.prefect_api_url or PREFECT_API_URL.value()
    if not url:
        raise MergeflowError(
            "no Prefect server: start one (`prefect server start --host 127.0.0.1`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api or run.prefect_api_url (docs/team.md)"
        )
    return url


def _settings(p: Params):
    """The params' Prefect server for what follows (``run.prefect_api_url`` over ``$PREFECT_API_URL``)."""
    if not p.run.prefect_api_url:
        return nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: p.run.prefect_api_url})


def ensure_process_pool(name: str) -> bool:
    """Create the work pool ``name`` as a process pool unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
        )
        return True


def _check_cron(cron: str | None) -> None:
    if cron is None:
        return
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise MergeflowError(f'--cron {cron!r}: not a cron expression (e.g. "0 2 * * *": every day at 02:00)') from None


def _params(params: Path) -> tuple[Params, Path]:
    path = Path(params).resolve()
    return load_params(path), path


def deploy_stage(p: Params) -> str:
    """The stage deployment on ``run.gpu.pool`` (the pool created if missing); returns its name."""
    from flows.remote import ENTRYPOINT, deployment_name, stage_flow

    pool = p.run.gpu.pool
    ensure_process_pool(pool)
    flow_ = stage_flow.from_source(source=str(SOURCE), entrypoint=ENTRYPOINT)
    flow_.deploy(
        name=pool,
        work_pool_name=pool,
        print_next_steps=False,
        ignore_warnings=True,
        description=f"one mergeflow stage on a worker of pool {pool!r} (run.gpu.stages)",
    )
    return deployment_name(pool)


def deploy(
    params: Path, cron: str | None = None, name: str | None = None, pool: str = DEFAULT_POOL, timezone: str | None = None
) -> list[str]:
    """``mergeflow deploy``: the pipeline deployment (scheduled by ``cron``, if given) and the stage
    deployment for the GPU pool. Returns the deployments' names."""
    _check_cron(cron)
    p, path = _params(params)
    name = name or p.experiment
    with _settings(p):
        api_url(p)
        try:
            ensure_process_pool(pool)
            schedules = None
            if cron:
                from prefect.schedules import Cron

                schedules = [Cron(cron, timezone=timezone) if timezone else Cron(cron)]
            flow_ = scheduled_run.from_source(source=str(SOURCE), entrypoint=RUN_ENTRYPOINT)
            flow_.deploy(
                name=name,
                work_pool_name=pool,
                schedules=schedules or [],
                parameters={"params": str(path)},
                print_next_steps=False,
                ignore_warnings=True,
                description=f"mergeflow run --params {path}",
            )
            return [f"{RUN_FLOW}/{name}", deploy_stage(p)]
        except MergeflowError:
            raise
        except Exception as exc:  # an unreachable server, a refused request: one line
            raise MergeflowError(f"mergeflow deploy: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def serve(params: Path, cron: str | None = None, name: str | None = None, timezone: str | None = None) -> None:
    """``mergeflow serve``: serve ``mergeflow-run/<name>`` (with the ``cron`` schedule) from this process
    until interrupted; the stage deployment is (re)created first when ``run.gpu.stages`` is set."""
    _check_cron(cron)
    p, path = _params(params)
    name = name or p.experiment
    with _settings(p):
        if p.run.gpu.stages:
            api_url(p)  # the GPU pool's workers need a server they share
            deploy_stage(p)
        schedules = None
        if cron:
            from prefect.schedules import Cron

            schedules = [Cron(cron, timezone=timezone) if timezone else Cron(cron)]
        scheduled_run.serve(
            name=name, schedules=schedules or [], parameters={"params": str(path)}, description=f"mergeflow run --params {path}"
        )
