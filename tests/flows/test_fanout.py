"""Fan-out: each stage's units through the task runner — threads, or a Dask LocalCluster on
127.0.0.1 (prefect-dask) — give the same artifacts and metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.hfcache import pipeline_workspace, small_zoo_params as params


def digests(ws: Path) -> dict[str, str]:
    return {
        str(f.relative_to(ws)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted((ws / "artifacts").rglob("*"))
        if f.is_file() and f.name != ".gitignore"
    }


def run(ws: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_units_of_each_stage():
    from mergeflow import stages
    from mergeflow.params import validate

    p = validate(params())
    assert stages.units("merge", p, Path("/nowhere")) == p.merge.methods
    assert stages.units("evaluate", p, Path("/nowhere")) == ["experts", "base", *p.merge.methods]
    with pytest.raises(Exception, match="no units"):
        stages.units("download", p, Path("/nowhere"))


@pytest.mark.server  # a Dask LocalCluster, beside the session's Prefect server
@pytest.mark.subprocess  # its worker processes, git and dvc init
@pytest.mark.timeout(150)
def test_dask_gives_the_thread_runners_results(tmp_path, prefect_server):
    pytest.importorskip("prefect_dask")
    threads = pipeline_workspace(tmp_path / "threads", params(task_runner="threads", workers=2))
    dask = pipeline_workspace(tmp_path / "dask", params(task_runner="dask", workers=2))
    run(threads)
    run(dask)
    assert json.loads((dask / "artifacts/eval/metrics.json").read_text()) == json.loads(
        (threads / "artifacts/eval/metrics.json").read_text()
    )
    # every artifact byte for byte, but where a Dask worker's other torch thread count shows in the
    # last bits: the query embeddings (the routing and metrics above do not change), and the SVD
    # merges (LAPACK blocks its work by the thread count), which must agree to float32 rounding
    a, b = digests(dask), digests(threads)
    assert a.keys() == b.keys()
    svd = ("tsv_m", "tsv_c", "iso_c", "iso_cts", "cart")
    differ = {k for k in a if a[k] != b[k]}
    assert {k for k in differ if not k.startswith(tuple(f"artifacts/merged/{m}/" for m in svd))} <= {
        "artifacts/switches/queries.safetensors",
        "artifacts/merged/autoswitch/queries.safetensors",
    }
    from mergeflow.io.checkpoint import Checkpoint

    for k in differ:
        if k.endswith("model.safetensors"):
            sa, sb = (Checkpoint(ws / k).state_dict() for ws in (dask, threads))
            assert sa.keys() == sb.keys()
            for name in sa:
                torch.testing.assert_close(sa[name], sb[name], rtol=1e-4, atol=1e-6)
    from mergeflow.autoswitch import QuerySet

    qa, qb = (QuerySet.load(ws / "artifacts/switches/queries.safetensors") for ws in (dask, threads))
    assert torch.equal(qa.labels, qb.labels) and torch.allclose(qa.embeddings, qb.embeddings, atol=1e-5)


def test_task_runner_from_params():
    from flows.pipeline import task_runner
    from mergeflow.params import validate

    pytest.importorskip("prefect_dask")
    runner = task_runner(validate(params(task_runner="dask", dask_address="tcp://127.0.0.1:1")))
    assert type(runner).__name__ == "DaskTaskRunner" and runner.address == "tcp://127.0.0.1:1"
    runner = task_runner(validate(params(task_runner="dask", workers=3)))
    assert runner.cluster_kwargs["host"] == "127.0.0.1" and runner.cluster_kwargs["n_workers"] == 3
    assert task_runner(validate(params(task_runner="threads", workers=3)))._max_workers == 3
