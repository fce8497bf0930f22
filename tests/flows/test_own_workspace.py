"""A workspace of the user's own (issue 17, friction 2 and 4): `mergeflow init` outside the
repository, raw BERT fine-tunes and their datasets named by relative paths, `mergeflow run` from
another folder, then `dvc status` clean; an edited dataset makes DVC list the download stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.models.test_family_bert import MAX_LENGTH, TASKS, make_bert

pytest.importorskip("transformers")


def dvc_status(ws: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "{}")


@pytest.mark.subprocess  # git, dvc
@pytest.mark.timeout(240)
def test_init_run_and_dvc_agree(tmp_path, prefect_server, monkeypatch):
    from flows.cli import app

    ws = tmp_path / "my-merges"
    res = CliRunner().invoke(app, ["init", str(ws)])
    assert res.exit_code == 0, res.output
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir() and (ws / "mergeflow-code.yaml").is_file()
    assert "mergeflow/" not in (ws / "dvc.yaml").read_text()  # no dependency on source files it lacks
    again = CliRunner().invoke(app, ["init", str(ws)])
    assert again.exit_code == 2 and f"{ws / 'params.yaml'}: exists" in again.output  # replaces nothing

    make_bert(ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    tasks = {t: {"model": f"experts/{t}", "dataset": f"data/{t}", "text_columns": c, "metric": m} for t, (c, m) in TASKS.items()}
    params["download"] = {
        "family": "text_classification",
        "base": "base",
        "tasks": tasks,
        "options": {"max_length": MAX_LENGTH, "query_pool": 0},
    }
    params["evaluate"] = {"plots": False, "batch_size": 4}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    monkeypatch.chdir(tmp_path)  # run from elsewhere: the paths start at params.yaml's folder
    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "updated dvc.yaml" in res.output  # the sources params name now
    deps = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["download"]["deps"]
    assert deps == ["base", "experts/single", "data/single", "experts/pair", "data/pair"]
    assert dvc_status(ws) == {}

    file = ws / "data/pair/data/validation-00000-of-00001.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(str(file)).to_pydict()
    table["label"][0] += 1.0
    import pyarrow as pa

    pq.write_table(pa.table(table), str(file))
    status = dvc_status(ws)
    assert set(status) == {"download"}, status
    # `dvc repro` works there too: the changed dataset's download and what follows run again
    import os

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Running stage 'download'" in proc.stdout and dvc_status(ws) == {}


def test_a_missing_section_is_named_before_dvc_fails(tmp_path):
    from tasks import workspace

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 0\ndevice: auto\ndownload: {}\ncompress: {}\nmerge: {}\nevaluate: {}\n")
    from mergeflow.errors import MergeflowError

    with pytest.raises(MergeflowError) as exc:
        workspace.check_sections(tmp_path / "params.yaml")
    assert (
        str(exc.value)
        == f"{tmp_path / 'params.yaml'}: no 'extract' key: dvc.yaml tracks it for DVC (write `extract: {{}}` to keep the defaults)"
    )
