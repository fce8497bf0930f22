"""Stages on a work pool: the pipeline hands each stage listed in ``run.gpu.stages`` to a
deployment of the small ``mergeflow-stage`` flow on the work pool ``run.gpu.pool``, whose
workers sit on GPU machines, and waits for it.

Artifacts reach the worker one of two ways (``run.gpu.transfer``):

* ``shared``: through the workspace path, passed as a parameter; it must name the same files
  on the worker's machine (the same machine, or a shared filesystem mounted at the same path).
* ``dvc``: through the DVC remote ``run.dvc_remote`` (tasks/transfer.py), the worker keeping its
  own copy of the workspace under ``run.gpu.workspace``; only the remote and the Prefect server
  are shared.

The worker reports what it did as a Prefect artifact (key ``mergeflow-stage-result``). Its code
comes from the deployment's source directory, which must hold the same mergeflow: the stage
refuses to run otherwise. Details: docs/team.md, section 4 (``run.gpu``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402

from mergeflow.errors import MergeflowError  # noqa: E402
from mergeflow.params import Params, validate  # noqa: E402
from mergeflow.stages import spec  # noqa: E402

STAGE_FLOW = "mergeflow-stage"
ENTRYPOINT = "flows/remote.py:stage_flow"  # relative to the repository root (the deployment's source)
WAIT_WARN_S = 30.0  # a run still waiting for a worker after this long: say how to start one


def deployment_name(pool: str) -> str:
    """The stage deployment for a pool is named after it: ``mergeflow-stage/<pool>``."""
    return f"{STAGE_FLOW}/{pool}"


def record_path(root: Path, stage: str) -> Path:
    """Where the worker leaves what ``run_stage`` returned, plus its host and pid."""
    return Path(root) / ".mergeflow" / "remote" / f"{stage}.json"


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a flow run (a direct call, a test)
        return logging.getLogger("mergeflow.remote")


RESULT_KEY = "mergeflow-stage-result"


def _report(result: dict) -> None:
    """The worker's result as an artifact of its flow run: a line for people, the JSON for the pipeline."""
    from prefect.artifacts import create_markdown_artifact

    state = "cached" if result["cached"] else f"ran in {result['seconds']:.1f} s"
    body = json.dumps(result, indent=1, sort_keys=True)
    create_markdown_artifact(
        markdown=f"**{result['stage']}** {state} on `{result['host']}` (pid {result['pid']})\n\n```json\n{body}\n```\n",
        key=RESULT_KEY,
        description=f"mergeflow stage {result['stage']}",
    )


def read_report(client, flow_run_id) -> dict | None:
    """What the worker reported for one flow run (``_report``), or None."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[RESULT_KEY])
        )
    )
    for art in arts:
        text = str(art.data or "")
        if "```json\n" in text:
            try:
                return json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
            except ValueError:
                continue
    return None


@flow(name=STAGE_FLOW, flow_run_name="{stage}", persist_result=False)
def stage_flow(stage: str, params: dict, root: str, code: str, transfer: Optional[dict] = None) -> dict:
    """One stage of the pipeline in this (the worker's) process: ``tasks.stages.run_stage``,
    cached by inputs as in the pipeline. ``params`` is ``Params.model_dump(mode="json")``,
    validated again here; ``code`` the pipeline's digest of the library's source; ``transfer``
    (``run.gpu.transfer: dvc``) the remote's URL, the inputs' DVC hashes, the upstream stamps and
    the parent workspace's ``host:path``, with ``root`` unused."""
    from mergeflow.io.atomic import write_json
    from tasks import cache
    from tasks.stages import run_stage

    host = socket.gethostname()
    p = validate(params, "params")
    if (mine := cache.code_digest()) != code:
        raise MergeflowError(
            f"the worker on {host} runs other mergeflow code than the pipeline (digest {mine[:12]} != "
            f"{code[:12]}): update the checkout at {Path.cwd()}"
        )
    if transfer is None:
        root_path = Path(root)
        if not (root_path / ".mergeflow").is_dir():
            raise MergeflowError(
                f"workspace {root} not found on {host}: a worker of pool {p.run.gpu.pool!r} needs the "
                f"workspace at the same path (a shared filesystem), or run.gpu.transfer: dvc "
                f"(see docs/team.md)"
            )
        result = run_stage(stage, p, root_path)
        result = {**result, "host": host, "pid": os.getpid()}
        write_json(record_path(root_path, stage), result)
    else:
        from mergeflow.io.lock import clean_stale, workspace_lock
        from mergeflow.stages import Layout
        from tasks import transfer as tr

        log = _logger()
        wroot = tr.worker_root(p.run.gpu.workspace, p.experiment, transfer["origin"])
        with workspace_lock(wroot, "wait", p.run.lock_timeout, log.info):  # one stage at a time per copy
            clean_stale(wroot / "artifacts")
            t0 = time.perf_counter()
            tr.prepare_worker(wroot, transfer["url"], transfer["inputs"], transfer["stamps"], transfer.get("dirs", []))
            log.info("%s: inputs in place in %s (%.1f s)", stage, wroot, time.perf_counter() - t0)
            result = run_stage(stage, p, wroot)
            t0 = time.perf_counter()
            outs = tr.add_and_push(wroot, Layout(wroot).outs(stage), tr.REMOTE)
            dirs = tr.empty_dirs(wroot, Layout(wroot).outs(stage))
            log.info("%s: outputs pushed to %s (%.1f s)", stage, transfer["url"], time.perf_counter() - t0)
            result = {
                **result,
                "host": host,
                "pid": os.getpid(),
                "workspace": str(wroot),
                "outs": outs,
                "dirs": dirs,
                "stamp": cache.read_stamp(wroot, stage),
            }
    _report(result)
    return result


def _api_url(p: Params) -> str:
    from prefect.settings import PREFECT_API_URL

    url = p.run.prefect_api_url or PREFECT_API_URL.value()
    if not url:
        raise MergeflowError(
            f"params: run.gpu.stages {p.run.gpu.stages} need a Prefect server shared with the workers of pool "
            f"{p.run.gpu.pool!r}: start one (`prefect server start --host 127.0.0.1`) and set "
            f"PREFECT_API_URL=http://127.0.0.1:4200/api or run.prefect_api_url (docs/team.md)"
        )
    return url


def check_pool(client, p: Params, url: str) -> int:
    """One-line errors for a missing pool or stage deployment; returns the number of workers online."""
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound

    pool, name = p.run.gpu.pool, deployment_name(p.run.gpu.pool)
    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise MergeflowError(
            f"work pool {pool!r} not found on the Prefect server at {url}: create it and the stage deployment "
            f"with `mergeflow deploy --params FILE` (run.gpu.pool: {pool})"
        ) from None
    try:
        dep = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise MergeflowError(
            f"deployment {name!r} not found on the Prefect server at {url}: create it with "
            f"`mergeflow deploy --params FILE` (run.gpu.pool: {pool})"
        ) from None
    if dep.work_pool_name != pool:
        raise MergeflowError(
            f"deployment {name!r} runs on pool {dep.work_pool_name!r}, not {pool!r}: "
            f"recreate it with `mergeflow deploy --params FILE`"
        )
    takes = set(((dep.parameter_openapi_schema or {}).get("properties") or {}))
    if p.run.gpu.transfer == "dvc" and takes and "transfer" not in takes:
        raise MergeflowError(
            f"deployment {name!r} was made by an older mergeflow without run.gpu.transfer: "
            f"recreate it with `mergeflow deploy --params FILE`"
        )
    online = client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
    return len(online)


def run_on_pool(stage: str, p: Params, root: Path, code: str) -> dict:
    """Run ``stage`` as a flow run of the deployment ``mergeflow-stage/<run.gpu.pool>``, wait for it,
    and return what ``run_stage`` returned there: ``{"stage", "cached", "seconds", "summary"}``.
    A stage whose inputs and outputs are unchanged is skipped here, as ``run_stage`` would skip it,
    without starting a flow run (a worker's flow-run process costs seconds to start)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import cache

    log = _logger()
    pool, name = p.run.gpu.pool, deployment_name(p.run.gpu.pool)
    t0 = time.perf_counter()
    if cache.is_fresh(p, root, stage):  # the pipeline's workspace tells: no worker needed
        log.info("%s: cached (inputs and outputs unchanged), skipped without a run on pool %r", stage, pool)
        summary = (cache.read_stamp(root, stage) or {}).get("summary", {})
        return {"stage": stage, "cached": True, "seconds": time.perf_counter() - t0, "summary": summary}
    url = _api_url(p)
    current = PREFECT_API_URL.value()
    same = bool(current) and current.rstrip("/") == url.rstrip("/")
    record_path(root, stage).unlink(missing_ok=True)
    transfer = None
    if p.run.gpu.transfer == "dvc":
        from tasks import transfer as tr

        t1 = time.perf_counter()
        remote = p.run.dvc_remote
        assert remote is not None  # params refuse transfer dvc for gpu stages without run.dvc_remote
        remote_url = tr.remote_url(root, remote)
        inputs = tr.push_inputs(root, stage, remote)
        stamps = {up: cache.read_stamp(root, up) for up in spec.upstream(stage)}
        dirs = tr.empty_dirs(root, [root / rel for rel in inputs])
        transfer = {"url": remote_url, "inputs": inputs, "dirs": dirs, "stamps": stamps, "origin": tr.origin(root)}
        log.info(
            "%s: inputs (%s) pushed to DVC remote %r in %.1f s",
            stage,
            ", ".join(inputs),
            p.run.dvc_remote,
            time.perf_counter() - t1,
        )
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        if not check_pool(client, p, url):
            log.warning(
                "%s: no worker online in pool %r yet; the run waits for one (`prefect worker start --pool %s` on a GPU machine)",
                stage,
                pool,
                pool,
            )
        # a subflow of the pipeline when both live on one server; parameters stay plain JSON
        parameters = {"stage": stage, "params": p.model_dump(mode="json"), "root": str(root), "code": code}
        if transfer is not None:  # (a stage deployment made before transfer existed takes shared runs still)
            parameters |= {"root": "", "transfer": transfer}
        fr = run_deployment(name, parameters=parameters, flow_run_name=stage, timeout=0, as_subflow=same)
        log.info("%s: flow run %s of %s submitted to pool %r", stage, fr.id, name, pool)
        warned = False
        while True:
            fr = client.read_flow_run(fr.id)
            if fr.state is not None and fr.state.is_final():
                break
            if not warned and fr.state is not None and fr.state.is_scheduled() and time.perf_counter() - t0 > WAIT_WARN_S:
                log.warning(
                    "%s: still waiting for a worker of pool %r after %.0f s (`prefect worker start --pool %s`)",
                    stage,
                    pool,
                    WAIT_WARN_S,
                    pool,
                )
                warned = True
            time.sleep(1.0)
        state = fr.state
        if not state.is_completed():
            msg = " ".join((state.message or "").split())
            raise MergeflowError(f"{stage}: flow run {fr.id} on pool {pool!r} ended {state.name}: {msg}"[:500])
        done = read_report(client, fr.id)
    if done is None:
        raise MergeflowError(
            f"{stage}: the worker of pool {pool!r} finished flow run {fr.id} but reported no result (artifact {RESULT_KEY!r})"
        )
    if transfer is not None:
        _fetch_outputs(stage, p, root, done, log)
    log.info(
        "%s: %s on pool %r (host %s, pid %s) in %.1f s",
        stage,
        "cached" if done["cached"] else "ran",
        pool,
        done["host"],
        done["pid"],
        time.perf_counter() - t0,
    )
    return {k: done[k] for k in ("stage", "cached", "seconds", "summary")}


def _fetch_outputs(stage: str, p: Params, root: Path, done: dict, log) -> None:
    """``transfer: dvc``: pull the outputs the worker pushed, check them against its stamp, stamp them here."""
    from mergeflow.io.atomic import write_json
    from mergeflow.stages import Layout
    from tasks import cache
    from tasks import transfer as tr

    t0 = time.perf_counter()
    remote = p.run.dvc_remote
    assert remote is not None  # params refuse transfer dvc for gpu stages without run.dvc_remote
    want = {p_.relative_to(root).as_posix() for p_ in Layout(root).outs(stage)}
    if set(done.get("outs") or {}) != want:
        raise MergeflowError(f"{stage}: the worker reported outputs {sorted(done.get('outs') or {})}, expected {sorted(want)}")
    tr.pull(root, done["outs"], remote, f"pulling the outputs of {stage} from remote {remote!r}", done.get("dirs", []))
    stamp = done["stamp"]
    got = cache.outs_digest(Layout(root).outs(stage), root)
    if not stamp or got != stamp["outs"]:
        cache.invalidate(root, stage)
        raise MergeflowError(
            f"{stage}: the outputs pulled from remote {p.run.dvc_remote!r} differ from what the worker on "
            f"{done['host']} wrote (content digest {str(got)[:12]} != {str((stamp or {}).get('outs'))[:12]})"
        )
    write_json(cache.stamp_path(root, stage), stamp)
    log.info(
        "%s: outputs (%s) pulled from DVC remote %r in %.1f s",
        stage,
        ", ".join(sorted(want)),
        p.run.dvc_remote,
        time.perf_counter() - t0,
    )
