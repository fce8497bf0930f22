"""The whole pipeline on a small zoo: Prefect flow, caching, DVC (status, selective repro, exp run), MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.hfcache import SMALL_ZOO

# every test reads the run of one git + DVC workspace (git, dvc and mergeflow subprocesses) on the
# session's Prefect server (marked `server` by conftest)
pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]


def sh(cmd: list[str], cwd: Path, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A git + DVC workspace holding the project's dvc.yaml, params.yaml (small zoo) and code deps."""
    ws = tmp_path_factory.mktemp("ws")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, ws / name)
    # with __pycache__ (DVC ignores it): test_editing_the_merge_stage runs this copy, whose unchanged
    # modules then need neither compiling nor their numba kernels building again (mtimes are kept)
    shutil.copytree(ROOT / "mergeflow", ws / "mergeflow")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiment"] = "pipeline-test"
    params["download"]["zoo"] = SMALL_ZOO
    assert "autoswitch" in params["merge"]["methods"]  # the default run scores Auto-Switch
    params["merge"]["autoswitch"] = {"k": 5}
    params["compress"]["queries"] = 20
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], ws)
    sh(["git", "config", "user.email", "t@example.com"], ws)
    sh(["git", "config", "user.name", "t"], ws)
    sh([sys.executable, "-m", "dvc", "init", "-q"], ws)
    sh(["git", "add", "-A"], ws)
    sh(["git", "commit", "-qm", "init"], ws)
    return ws


def _tree_digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def reported(methods: list[str]) -> list[str]:
    """The rows metrics.json has for the listed methods: Auto-Switch has one per routing mode."""
    return [
        r for m in methods for r in ([f"autoswitch_{mode}" for mode in ("batch", "sample", "hard")] if m == "autoswitch" else [m])
    ]


@pytest.fixture(scope="module")
def first_run(workspace, prefect_server):
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--params", str(workspace / "params.yaml")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.mark.timeout(240)
def test_metrics_contract(workspace, first_run):
    metrics = json.loads((workspace / "artifacts/eval/metrics.json").read_text())
    tasks = json.loads((workspace / "artifacts/sources.json").read_text())["tasks"]
    assert len(tasks) == 2
    listed = reported(yaml.safe_load((workspace / "params.yaml").read_text())["merge"]["methods"])
    assert set(metrics["methods"]) == set(listed) >= {"weight_average", "task_arithmetic", "ties", "emr", "tall_mask", "tswitch"}
    # Auto-Switch: one row per routing mode, with routing accuracy; its storage counts the query set
    queries = (workspace / "artifacts/merged/autoswitch/queries.safetensors").stat().st_size
    data = 2 * 20 * (4 * 32 + 8)  # 20 queries per task: float32 embeddings (projection dim 32) + int64 labels
    assert data < queries < data + 1024  # plus a safetensors header
    for mode in ("batch", "sample", "hard"):
        row = metrics["methods"][f"autoswitch_{mode}"]
        assert 0.0 <= row["routing_acc"] <= 1.0
        assert row["storage_bytes"] == metrics["methods"]["tswitch"]["storage_bytes"] + queries
    for row in [metrics["base"], metrics["experts"], *metrics["methods"].values()]:
        assert set(row["acc"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["acc"].values())
        assert row["acc_avg"] == pytest.approx(sum(row["acc"].values()) / len(tasks))
        assert isinstance(row["storage_bytes"], int)
        assert 0.0 <= row["storage_ratio"] <= 1.0
    assert metrics["methods"]["tswitch"]["dynamic"] is True and metrics["methods"]["task_arithmetic"]["dynamic"] is False
    ex = metrics["experts"]
    assert ex["norm_acc_avg"] == pytest.approx(1.0) and ex["storage_ratio"] == pytest.approx(1.0)
    for name, row in metrics["methods"].items():
        want = sum(row["acc"][t] / ex["acc"][t] for t in tasks) / len(tasks)
        assert row["norm_acc_avg"] == pytest.approx(want)
    # static merges store one float32 model: 1/T of the task vectors
    assert metrics["methods"]["task_arithmetic"]["storage_ratio"] == pytest.approx(1 / len(tasks), rel=0.01)
    # T-Switch keeps a few per cent of the float32 task vectors
    assert metrics["methods"]["tswitch"]["storage_ratio"] < 0.08
    assert 1.0 < metrics["switches"]["bits_per_param"] < 1.6
    # EMR keeps tau_uni in float32 plus one mask bit per entry and a rescaler per task
    n = metrics["methods"]["task_arithmetic"]["storage_bytes"] // 4
    assert metrics["methods"]["emr"]["storage_bytes"] == 4 * n + len(tasks) * ((n + 7) // 8 + 4)
    csv = (workspace / "artifacts/eval/per_task.csv").read_text().splitlines()
    assert csv[0] == "model,task,acc,norm_acc" and len(csv) == 1 + (2 + len(listed)) * len(tasks)
    for plot in ("accuracy.png", "normalised.png", "storage.png", "routing.png"):  # routing: Auto-Switch's modes
        assert (workspace / "artifacts/eval/plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tswitch" in first_run.output and "normalised" in first_run.output and "routing acc" in first_run.output


@pytest.mark.parametrize("method", ["ties", "tswitch", "emr", "tall_mask"])
def test_export_of_a_zoo_task_scores_what_metrics_json_says(workspace, first_run, tmp_path, method):
    """`mergeflow export` on the zoo: the merged CLIP vision tower (the task's own one for the
    dynamic methods) that transformers loads, with its zero-shot head; it scores metrics.json's accuracy."""
    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    from flows.cli import app
    from mergeflow.models import get_family

    task = json.loads((workspace / "artifacts/sources.json").read_text())["tasks"][1]
    out = tmp_path / "export"
    args = ["export", "--params", str(workspace / "params.yaml"), "--method", method, "--task", task, "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    model, info = CLIPVisionModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with safe_open(str(out / "head.safetensors"), "pt") as fh:
        weight, scale, classes = (
            fh.get_tensor("weight"),
            float(fh.metadata()["logit_scale"]),
            json.loads(fh.metadata()["classes"]),
        )
    assert list(model.config.id2label.values()) == classes
    data = get_family("zoo")(workspace / "artifacts").load_data(task, "test")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.eval()(pixel_values=data.pixel_values()).image_embeds, dim=-1)
    acc = float(((scale * emb @ weight.T).argmax(-1) == data.labels).float().mean())
    metrics = json.loads((workspace / "artifacts/eval/metrics.json").read_text())
    assert acc == pytest.approx(metrics["methods"][method]["acc"][task], abs=1e-9)


def test_dvc_status_clean_after_run(workspace, first_run):
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], workspace).stdout or "{}") == {}
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "extract", "compress", "merge", "evaluate"}


def test_mlflow_record(workspace, first_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    parent = parents[-1]
    assert parent.data.tags["dvc_lock_sha256"] and parent.data.tags["git_commit"]
    assert "experts.acc_avg" in parent.data.metrics and "switches.bits_per_param" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    listed = reported(yaml.safe_load((workspace / "params.yaml").read_text())["merge"]["methods"])
    assert {c.data.tags["mergeflow.method"] for c in children} == set(listed)
    metrics = json.loads((workspace / "artifacts/eval/metrics.json").read_text())
    ta = next(c for c in children if c.data.tags["mergeflow.method"] == "task_arithmetic")
    assert ta.data.metrics["norm_acc_avg"] == pytest.approx(metrics["methods"]["task_arithmetic"]["norm_acc_avg"])
    assert ta.data.params["scaling"] == "0.3"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/per_task.csv", "eval/plots"} <= artifacts


def test_second_run_is_cached(workspace, first_run):
    from flows.cli import app

    before = (workspace / "artifacts/eval/metrics.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["run", "--params", str(workspace / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert "stages cached: download, extract, compress, merge, evaluate" in res.output
    assert (workspace / "artifacts/eval/metrics.json").stat().st_mtime_ns == before
    # MLflow says so too: the newest parent run carries the stages it skipped
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list", order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 2
    assert parents[0].data.tags["mergeflow.cached_stages"] == "download,extract,compress,merge,evaluate"
    assert parents[-1].data.tags["mergeflow.cached_stages"] == "none"


@pytest.mark.timeout(150)
def test_editing_the_merge_stage_reruns_merge_alone(workspace, first_run):
    """A comment edited in the module of the merge stage: `dvc status` lists merge alone, and
    `mergeflow run` (running the workspace's copy of the code) reruns merge, not the stages before it."""
    from prefect.settings import PREFECT_API_URL

    module = workspace / "mergeflow" / "stages" / "merge.py"
    original = module.read_text()
    env = {"PYTHONPATH": str(workspace)}
    if url := PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = url  # the session's server, not a temporary one of its own
    try:
        module.write_text(original + "# a comment only\n")
        status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], workspace).stdout)
        assert set(status) == {"merge"}, status
        merged_before = _tree_digest(workspace / "artifacts/merged")
        out = sh(
            [sys.executable, "-c", "from flows.cli import main; main()", "run", "--params", "params.yaml", "--no-track"],
            workspace,
            env_extra=env,
        ).stdout  # MLflow's record is test_mlflow_record's
        cached = out.rsplit("stages cached: ", 1)[1].split(";")[0].split(", ")
        # evaluate reruns exactly when merge's outputs changed (SVD merges may differ in the last bit
        # between processes with other thread counts), as DVC would decide
        same = _tree_digest(workspace / "artifacts/merged") == merged_before
        assert cached == ["download", "extract", "compress"] + (["evaluate"] if same else []), out[-2000:]
    finally:
        module.write_text(original)


@pytest.mark.timeout(200)
def test_selective_repro_and_exp_run(workspace, first_run):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["merge"]["task_arithmetic"]["scaling"] = 0.5
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], workspace).stdout)
    assert set(status) == {"merge", "evaluate"}
    # what follows is about which stages DVC runs, not about the methods: two of them (a merge
    # edit stales the same stages) keep its three stage reruns short
    params["merge"]["methods"] = ["task_arithmetic", "tswitch"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([sys.executable, "-m", "dvc", "repro"], workspace).stdout
    ran = {s for s in ("download", "extract", "compress", "merge", "evaluate") if f"Running stage '{s}'" in out}
    assert ran == {"merge", "evaluate"}, out
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], workspace).stdout or "{}") == {}
    sh(["git", "add", "-A"], workspace)
    sh(["git", "commit", "-qm", "scaling 0.5"], workspace)
    out = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "compress.drop=0.8"], workspace).stdout
    ran = {s for s in ("download", "extract", "compress", "merge", "evaluate") if f"Running stage '{s}'" in out}
    assert ran == {"compress", "merge", "evaluate"}, out
    metrics = json.loads((workspace / "artifacts/eval/metrics.json").read_text())
    assert metrics["switches"]["drop"] == 0.8
