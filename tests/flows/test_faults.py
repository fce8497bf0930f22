"""Faults: a run killed mid-stage resumes where it stopped; one run per workspace at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.io.lock import clean_stale, workspace_lock
from tests.hfcache import pipeline_workspace, sh, small_zoo_params

# orchestration only (locks, resume): a static merge, a trimmed one, the switches and the routed one
METHODS = ["task_arithmetic", "ties", "tswitch", "autoswitch"]


def small_params(*, slow_evaluate: bool = False, **run) -> dict:
    params = small_zoo_params(**run)
    params["merge"]["methods"] = METHODS
    if slow_evaluate:
        params["evaluate"]["batch_size"] = 1  # a few seconds of evaluate: time to kill it mid-stage
    return params


class Run:
    """``mergeflow run --no-track`` in a subprocess of its own process group, its output collected;
    on the Prefect server at ``api_url``, else on a temporary one of its own (a run's default)."""

    def __init__(self, ws: Path, api_url: str | None = None):
        env = dict(
            os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PREFECT_LOGGING_LEVEL="INFO"
        )
        env.pop("PREFECT_API_URL", None)
        if api_url:
            env["PREFECT_API_URL"] = api_url
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mergeflow"), "run", "--no-track"],
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        end = time.time() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.time() > end:
                raise AssertionError(f"never saw {text!r}:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the run and its temporary Prefect server
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def artifact_digests(ws: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for f in sorted((ws / "artifacts").rglob("*")):
        if f.is_file():
            out[str(f.relative_to(ws))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    """The session's Prefect server: runs that don't test the temporary server skip starting one."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, api_url) -> tuple[Path, list[Run], dict[str, str]]:
    """Two real runs started together on one workspace, and the artifacts they leave: the one
    that takes the lock runs uninterrupted, the other finds every stage done."""
    ws = pipeline_workspace(tmp_path_factory.mktemp("two") / "ws", small_params(slow_evaluate=True))
    runs = [Run(ws, api_url), Run(ws, api_url)]
    for run in runs:
        assert run.finish() == 0, run.output[-3000:]
    return ws, runs, artifact_digests(ws)


@pytest.fixture(scope="module")
def reference(two_runs) -> dict[str, str]:
    """An uninterrupted run's artifacts (the same params as the killed run's)."""
    return two_runs[2]


@pytest.mark.server
@pytest.mark.subprocess
@pytest.mark.timeout(240)
def test_killed_mid_stage_resumes_without_recomputing(reference, tmp_path, api_url):
    """SIGKILL during evaluate, the run and its temporary Prefect server (no server given, as a
    user's first `mergeflow run`: the suite's one run on a temporary server); the rerun skips
    download..merge and ends with the same artifacts as an uninterrupted run."""
    ws = pipeline_workspace(tmp_path / "ws", small_params(slow_evaluate=True))
    run = Run(ws)
    run.wait_for("evaluate: running")
    assert "Starting temporary server" in run.output, run.output[-3000:]
    run.kill()
    assert not (ws / "artifacts/eval/metrics.json").exists()  # evaluate never finished
    rerun = Run(ws, api_url)
    assert rerun.finish() == 0, rerun.output[-3000:]
    for stage in ("download", "extract", "compress", "merge"):
        assert f"{stage}: cached" in rerun.output, rerun.output[-3000:]
    assert "evaluate: running" in rerun.output
    assert artifact_digests(ws) == reference
    assert not [p for p in (ws / "artifacts").rglob(".*") if p.name not in (".gitignore", ".mergeflow-output")]  # no leftovers


@pytest.mark.server
@pytest.mark.subprocess
@pytest.mark.timeout(180)
def test_second_run_waits_for_the_first(tmp_path, api_url):
    """Two runs on one workspace: the second waits for the workspace, then ends correctly."""
    ws = pipeline_workspace(tmp_path / "ws", small_params(dvc_remote="team"))
    sh([sys.executable, "-m", "dvc", "remote", "add", "team", str(tmp_path / "remote")], ws)
    with workspace_lock(ws):  # stands in for a first run holding the workspace
        run = Run(ws, api_url)
        run.wait_for("is in use by another run")
        time.sleep(1.0)
        assert run.proc.poll() is None and not (ws / "artifacts").exists()  # waiting, nothing written
    assert run.finish() == 0, run.output[-3000:]
    assert json.loads((ws / "artifacts/eval/metrics.json").read_text())["methods"]
    # run.dvc_remote: the committed outputs were pushed to the team's remote
    pushed = [f for f in (tmp_path / "remote").rglob("*") if f.is_file()]
    assert len(pushed) >= len([f for f in (ws / "artifacts").rglob("*") if f.is_file() and f.name != ".gitignore"]) // 2
    assert "cache and remote are in sync" in sh([sys.executable, "-m", "dvc", "status", "-c", "-r", "team"], ws).lower() or sh(
        [sys.executable, "-m", "dvc", "status", "-c", "-r", "team", "--json"], ws
    ).strip() in ("{}", "")


def test_tracking_uri_from_params_then_environment(tmp_path, monkeypatch):
    from mergeflow.params import validate
    from tasks.track import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path, validate({})) == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path, validate({})) == "http://127.0.0.1:5000"
    assert tracking_uri(tmp_path, validate({"run": {"tracking_uri": "http://127.0.0.1:5001"}})) == "http://127.0.0.1:5001"


@pytest.mark.server
@pytest.mark.subprocess
@pytest.mark.timeout(240)
def test_two_runs_at_once_both_end_correctly(two_runs):
    """Two real runs started together on one workspace: one takes the lock and does the work, the
    other waits for it, then finds every stage done (all cached); both exit 0 and the outputs are
    whole (DVC agrees)."""
    ws, runs, _ = two_runs
    waited = [run for run in runs if "is in use by another run" in run.output]
    assert len(waited) == 1, [run.output[-1500:] for run in runs]
    worked = runs[1 - runs.index(waited[0])]
    assert "stages cached: download, extract, compress, merge, evaluate;" in waited[0].output
    assert "stages cached: none;" in worked.output
    assert json.loads((ws / "artifacts/eval/metrics.json").read_text())["methods"]
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], ws) or "{}") == {}


@pytest.mark.server
@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_second_run_refuses_clearly(tmp_path, api_url):
    ws = pipeline_workspace(tmp_path / "ws", small_params(lock="refuse"))
    with workspace_lock(ws):
        run = Run(ws, api_url)
        assert run.finish(timeout=120) == 2
    errors = [line for line in run.output.splitlines() if line.startswith("mergeflow: error:")]
    assert len(errors) == 1 and "workspace in use by another mergeflow run (pid " in errors[0], run.output[-2000:]
    assert not (ws / "artifacts").exists()


def _hold(root: str, ready, release) -> None:
    with workspace_lock(Path(root)):
        ready.set()
        release.wait(30)


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_lock_between_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(MergeflowError) as exc:
            with workspace_lock(tmp_path, "refuse"):
                pass
        assert f"pid {holder.pid} on " in str(exc.value) and "\n" not in str(exc.value)
        t0 = time.monotonic()
        with pytest.raises(MergeflowError, match=r"still in use .* after 0 s \(run.lock_timeout\)"):
            with workspace_lock(tmp_path, "wait", timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        release.set()
        holder.join(30)
    with workspace_lock(tmp_path, "refuse"):  # released with its holder
        assert json.loads((tmp_path / ".mergeflow/run.owner.json").read_text())["pid"] == os.getpid()


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_killed_holder_releases_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with workspace_lock(tmp_path, "refuse"):
        pass


def test_clean_stale_removes_only_leftovers(tmp_path):
    art = tmp_path / "artifacts"
    (art / "merged" / "ties").mkdir(parents=True)
    (art / "merged" / "ties" / "model.safetensors").write_bytes(b"x")
    (art / ".merged.abc.tmp").mkdir()
    (art / ".merged.abc.tmp" / "junk").write_bytes(b"y")
    (art / ".download.xyz").mkdir()
    (art / "eval").mkdir()
    (art / "eval" / ".metrics.json.123.tmp").write_bytes(b"z")
    removed = clean_stale(art)
    assert {p.name for p in removed} == {".merged.abc.tmp", ".download.xyz", ".metrics.json.123.tmp"}
    assert [p.relative_to(art).as_posix() for p in sorted(art.rglob("*"))] == [
        "eval",
        "merged",
        "merged/ties",
        "merged/ties/model.safetensors",
    ]
