"""Deployments, schedules and GPU workers (issue 6): ``mergeflow deploy`` registers the scheduled
pipeline and the stage deployment on a Prefect server bound to 127.0.0.1 (the session's test
server); a process worker of the ``gpu`` pool, a subprocess, runs the merge and evaluate stages of
a triggered pipeline run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from typer.testing import CliRunner

from mergeflow.errors import MergeflowError
from tests.hfcache import SMALL_ZOO, pipeline_workspace

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
METHODS = ["task_arithmetic", "tswitch"]


def small_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiment"] = "deploy-test"
    params["download"]["zoo"] = SMALL_ZOO
    params["merge"]["methods"] = METHODS
    params["compress"]["queries"] = 10
    params["evaluate"]["plots"] = False
    params["run"]["gpu"] = {"pool": "gpu", "stages": ["merge", "evaluate"]}
    return params


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url.startswith("http://127.0.0.1:")
    return url


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return pipeline_workspace(tmp_path_factory.mktemp("deploy") / "ws", small_params())


@pytest.fixture(scope="module")
def deployed(ws, api_url):
    from flows.cli import app

    res = CliRunner().invoke(app, ["deploy", "--params", str(ws / "params.yaml"), "--cron", "0 2 * * *", "--name", "nightly"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.mark.subprocess  # the workspace: git and dvc init
def test_deploy_registers_scheduled_pipeline_and_stage_deployments(ws, deployed):
    """The pipeline deployment carries the cron schedule and the params file's path; the stage
    deployment sits on the gpu pool; both pools were created as process pools."""
    from prefect.client.orchestration import get_client

    from flows.deploy import SOURCE

    assert "mergeflow-run/nightly" in deployed and "mergeflow-stage/gpu" in deployed
    with get_client(sync_client=True) as client:
        run = client.read_deployment_by_name("mergeflow-run/nightly")
        assert [s.schedule.cron for s in run.schedules] == ["0 2 * * *"]
        assert all(s.active for s in run.schedules)
        assert run.parameters == {"params": str((ws / "params.yaml").resolve())}
        assert run.work_pool_name == "mergeflow"
        assert run.entrypoint == "flows/deploy.py:scheduled_run"
        assert run.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(SOURCE)}}]
        stage = client.read_deployment_by_name("mergeflow-stage/gpu")
        assert stage.work_pool_name == "gpu" and stage.entrypoint == "flows/remote.py:stage_flow" and not stage.schedules
        assert {client.read_work_pool(n).type for n in ("mergeflow", "gpu")} == {"process"}


def _sqlalchemy_21() -> bool:
    return tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)


@pytest.mark.subprocess  # the workspace: git and dvc init
@pytest.mark.xfail(
    _sqlalchemy_21(),
    strict=True,
    raises=sqlalchemy.exc.InvalidRequestError,
    reason="SQLAlchemy 2.1 breaks the Prefect 3.8 server's scheduler: its bulk "
    "insert of scheduled flow runs raises 'Can't evaluate bulk DML statement' (pin sqlalchemy<2.1)",
)
def test_server_scheduler_creates_the_cron_runs(ws, deployed):
    """What the Prefect server's scheduler service does for the deployment (its own function, on the
    test server's database): flow runs at 02:00 UTC with the params file as their parameter."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.server.database import provide_database_interface
    from prefect.server.models.deployments import schedule_runs

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("mergeflow-run/nightly")

    async def schedule():
        db = provide_database_interface()
        async with db.session_context(begin_transaction=True) as session:
            return await schedule_runs(session, deployment_id=dep.id, min_runs=2, max_runs=2)

    ids = asyncio.run(schedule())
    assert len(ids) == 2
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(i) for i in ids]
    for run in runs:
        assert run.state.is_scheduled() and run.deployment_id == dep.id and run.work_pool_name == "mergeflow"
        assert (run.expected_start_time.hour, run.expected_start_time.minute) == (2, 0)
        assert run.parameters == {"params": str((ws / "params.yaml").resolve())}
        assert run.expected_start_time.utcoffset().total_seconds() == 0


@pytest.mark.subprocess  # the workspace: git and dvc init
def test_deploy_refuses_a_bad_cron_on_one_line(ws, api_url):
    from flows.cli import app

    res = CliRunner().invoke(app, ["deploy", "--params", str(ws / "params.yaml"), "--cron", "every night"])
    assert res.exit_code == 2
    assert (
        res.output.strip()
        == "mergeflow: error: --cron 'every night': not a cron expression (e.g. \"0 2 * * *\": every day at 02:00)"
    )


@pytest.mark.subprocess  # the workspace: git and dvc init
def test_missing_server_pool_or_stage_deployment_is_one_line(ws, api_url, deployed):
    from flows.deploy import ensure_process_pool
    from flows.remote import run_on_pool
    from mergeflow.params import load_params

    from prefect.settings import PREFECT_API_URL, temporary_settings

    p = load_params(ws / "params.yaml")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # `mergeflow run` on its temporary server
        with pytest.raises(
            MergeflowError,
            match=r"params: run.gpu.stages \['merge', 'evaluate'\] need a Prefect server shared "
            r"with the workers of pool 'gpu': start one .*PREFECT_API_URL=",
        ):
            run_on_pool("merge", p, ws, "x")
    p = load_params(ws / "params.yaml", ["run.gpu.pool=nopool"])
    with pytest.raises(
        MergeflowError,
        match=r"work pool 'nopool' not found on the Prefect server at http://127\.0\.0\.1:\d+/api: "
        r"create it and the stage deployment with `mergeflow deploy --params FILE`",
    ):
        run_on_pool("merge", p, ws, "x")
    ensure_process_pool("bare")
    p = load_params(ws / "params.yaml", ["run.gpu.pool=bare"])
    with pytest.raises(MergeflowError, match=r"deployment 'mergeflow-stage/bare' not found .*`mergeflow deploy --params FILE`"):
        run_on_pool("merge", p, ws, "x")


def _env(api_url: str) -> dict:
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PREFECT_API_URL=api_url,
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_WORKER_QUERY_SECONDS="1",
        OMP_NUM_THREADS="1",
    )


@pytest.fixture(scope="module")
def gpu_worker(api_url, deployed, tmp_path_factory):
    """``prefect worker start --pool gpu --type process``: a subprocess in its own process group, one
    for the module's tests (each tells its flow runs apart by id); started once the pool exists."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process", "--name", "gpu-test-worker"],
            env=_env(api_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, log
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


# SLOW (40-60 s): three Prefect processes and a small pipeline on 2 cores
@pytest.mark.subprocess
@pytest.mark.timeout(240)
def test_triggered_run_sends_merge_and_evaluate_to_the_gpu_worker(ws, deployed, api_url, gpu_worker):
    """Trigger the deployed pipeline; its flow run is executed here (`prefect flow-run execute`, what a
    worker of the `mergeflow` pool does); merge and evaluate go to the gpu pool's worker process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment

    from flows.remote import record_path
    from tasks.cache import read_stamp

    def runs(client, flow_name: str, exclude=frozenset()) -> list:
        return [
            r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))) if r.id not in exclude
        ]

    worker, log = gpu_worker
    with get_client(sync_client=True) as client:  # the session's server may hold other modules' runs
        before = {r.id for name in ("mergeflow-stage", "mergeflow-pipeline") for r in runs(client, name)}
    run = run_deployment("mergeflow-run/nightly", parameters={"track": False}, timeout=0, as_subflow=False)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "prefect"), "flow-run", "execute", str(run.id)], env=_env(api_url), capture_output=True, text=True, timeout=240
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log.read_text()[-3000:]
    assert worker.poll() is None  # the worker is still up

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.is_completed()
        stage_runs = runs(client, "mergeflow-stage", before)
        pipeline = runs(client, "mergeflow-pipeline", before)
    assert {r.name for r in stage_runs} == {"merge", "evaluate"}
    worker_log = log.read_text()
    for r in stage_runs:
        assert r.state.is_completed(), (r.name, r.state)
        assert r.work_pool_name == "gpu" and r.deployment_id is not None
        assert str(r.id) in worker_log  # the worker submitted it
        pid = int(r.infrastructure_pid.rsplit(":", 1)[-1])  # the process the worker started for it
        rec = json.loads(record_path(ws, r.name).read_text())
        assert rec["pid"] == pid == read_stamp(ws, r.name)["pid"] and rec["cached"] is False
        assert r.parent_task_run_id is not None  # linked as a subflow of the pipeline run
    assert len(pipeline) == 1 and pipeline[0].state.is_completed()
    # the CPU stages ran in the pipeline's own process, not in the worker's
    local = {read_stamp(ws, s)["pid"] for s in ("download", "extract", "compress")}
    assert len(local) == 1 and not local & {read_stamp(ws, s)["pid"] for s in ("merge", "evaluate")}

    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    tasks = json.loads((ws / "artifacts/sources.json").read_text())["tasks"]
    assert set(metrics["methods"]) == set(METHODS) and len(tasks) == 2
    for row in [metrics["base"], metrics["experts"], *metrics["methods"].values()]:
        assert set(row["acc"]) == set(tasks)
    # nothing changed: the pipeline skips the stage itself, no flow run on the pool
    from flows.remote import run_on_pool
    from mergeflow.params import load_params
    from tasks.cache import code_digest

    again = run_on_pool("merge", load_params(ws / "params.yaml"), ws, code_digest())
    assert again["cached"] is True and again["summary"] == read_stamp(ws, "merge")["summary"]
    with get_client(sync_client=True) as client:
        assert len(runs(client, "mergeflow-stage", before)) == 2
    print(f"triggered run executed in {elapsed:.1f} s")


def _files(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``root``: empty folders count too."""
    return {f.relative_to(root).as_posix(): f.read_bytes() if f.is_file() else None for f in sorted(root.rglob("*"))}


# SLOW (30-45 s): a small pipeline whose merge and evaluate stages run on the worker
@pytest.mark.subprocess
@pytest.mark.timeout(360)
def test_dvc_transfer_moves_the_artifacts_through_the_remote(deployed, api_url, gpu_worker, tmp_path):
    """``run.gpu.transfer: dvc``: the worker gets no path into the pipeline's workspace; it pulls
    the stage inputs from the DVC remote into its own copy, runs merge and evaluate there and
    pushes the outputs, which the pipeline pulls back byte for byte and stamps as the worker did."""
    from flows.remote import record_path
    from tasks.cache import read_stamp
    from tasks.transfer import origin, worker_root

    params = small_params()
    params["experiment"] = "deploy-dvc"
    params["run"]["gpu"] |= {"transfer": "dvc", "workspace": str(tmp_path / "workers")}
    params["run"]["dvc_remote"] = "team"
    ws2 = pipeline_workspace(tmp_path / "ws2", params)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "team", str(tmp_path / "remote")], cwd=ws2, check=True)

    cmd = [str(BIN / "mergeflow"), "run", "--params", str(ws2 / "params.yaml"), "--no-track"]
    proc = subprocess.run(cmd, env=_env(api_url), cwd=ws2, capture_output=True, text=True, timeout=300)
    worker, log = gpu_worker
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log.read_text()[-3000:]
    assert "stages cached: none;" in proc.stdout

    copy = worker_root(str(tmp_path / "workers"), "deploy-dvc", origin(ws2))
    assert copy.is_dir() and not (copy / ".git").exists()
    for stage in ("merge", "evaluate"):  # run by the worker, in its copy, stamped the same on both sides
        assert not record_path(ws2, stage).exists()  # the shared-path record: the worker never wrote into ws2
        here, there = read_stamp(ws2, stage), read_stamp(copy, stage)
        assert here == there and here["pid"] != read_stamp(ws2, "download")["pid"]
    for out in ("merged", "eval"):
        assert _files(ws2 / "artifacts" / out) == _files(copy / "artifacts" / out)
    for inp in ("checkpoints", "vectors", "switches", "data"):  # pulled from the remote into the copy
        assert _files(ws2 / "artifacts" / inp) == _files(copy / "artifacts" / inp)
    assert not list((ws2 / "artifacts").glob(".transfer.*"))  # scratch folders gone
    metrics = json.loads((ws2 / "artifacts/eval/metrics.json").read_text())
    assert set(metrics["methods"]) == set(METHODS)
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "-c", "-r", "team"],
        cwd=ws2,
        capture_output=True,
        text=True,
        env=dict(os.environ, DVC_NO_ANALYTICS="1"),
    )
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr

    # a later run over the same copy pulls only the inputs whose hash or files changed:
    # tests/tasks/test_transfer.py::test_worker_copy_pulls_only_what_changed (prepare_worker, no Prefect)


def test_dvc_transfer_needs_a_remote_named_in_params():
    from mergeflow.params import validate

    params = small_params()
    params["run"]["gpu"]["transfer"] = "dvc"
    with pytest.raises(MergeflowError, match=r"^params: run.gpu.transfer: dvc .* set run.dvc_remote"):
        validate(params)


@pytest.mark.subprocess
@pytest.mark.timeout(180)  # beyond its own 60 s waits, which say what went wrong
def test_serve_registers_the_schedule_and_pauses_it_on_shutdown(ws, api_url, deployed):
    """``mergeflow serve`` (a subprocess): the served deployment carries the cron schedule while it
    runs; interrupted, it pauses the schedule (Prefect's ``pause_on_shutdown``)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    log = ws.parent / "serve.log"  # a file, not a pipe nobody reads (a full pipe would block the process)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mergeflow"), "serve", "--params", str(ws / "params.yaml"), "--cron", "30 1 * * *", "--name", "served"],
            env=_env(api_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # a shell's background job ignores SIGINT, and a child would inherit that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    served = client.read_deployment_by_name("mergeflow-run/served")
                    if served.schedules:
                        break
                except ObjectNotFound:
                    pass
                assert time.monotonic() < deadline, "mergeflow serve registered no deployment in 60 s"
                time.sleep(0.5)
            assert [(s.schedule.cron, s.active) for s in served.schedules] == [("30 1 * * *", True)]
            assert served.work_pool_name is None  # served from the process, no pool
            assert served.parameters == {"params": str((ws / "params.yaml").resolve())}
            while "is being served" not in log.read_text():  # the runner's polling loop has started
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"mergeflow serve did not stop within 60 s of SIGINT:\n{log.read_text()[-3000:]}") from None
            served = client.read_deployment_by_name("mergeflow-run/served")
            assert served.paused or not any(s.active for s in served.schedules)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
