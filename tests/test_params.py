"""params.yaml validation: unknown keys, bad values, unknown methods, missing files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeflow.errors import MergeflowError
from mergeflow.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.compress.drop == 0.6 and "tswitch" in p.merge.methods
    assert p.merge.hyper("task_arithmetic") == {"scaling": 0.3}
    assert p.download.source == "zoo://digits" and p.download.family is None


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    p = load_params(preset)
    assert p.download.family and p.download.base and p.download.tasks


@pytest.mark.parametrize(
    "data, where",
    [
        (
            {"merge": {"methods": ["task_arithmetic"], "task_arithmetic": {"scalling": 1}}},
            "merge.task_arithmetic.scalling: unknown",
        ),
        ({"compress": {"drop": 1.5}}, "compress.drop"),
        ({"compress": {"dorp": 0.5}}, "compress.dorp: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"merge": {"methods": ["ta"]}}, "unknown method 'ta'"),
        ({"merge": {"methods": ["tswitch"], "tswitch": {"drop": 0.3}}}, "set compress.drop"),
        ({"seed": -1}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"download": {"zoo": {"n_taks": 3}}}, "unknown zoo option 'n_taks'"),
        ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
        ({"download": {"source": "hf://org/name"}}, "download.source: unsupported source"),
        ({"download": {"family": "clip_vision", "tasks": {"a": {"model": "x"}}}}, "download.base: required with a family"),
        ({"download": {"family": "clip_vision", "base": "b"}}, "download.tasks: at least one task"),
        ({"download": {"family": "vit", "base": "b", "tasks": {"a": {"model": "x"}}}}, "unknown model family 'vit'"),
        (
            {"download": {"family": "clip_vision", "base": "b", "tasks": {"a": {"dataset": "d"}}}},
            "download.tasks.a.model: required",
        ),
        (
            {"download": {"family": "clip_vision", "base": "b", "tasks": {"base": {"model": "x"}}}},
            "download.tasks.base: not a usable task name",
        ),
        (
            {"download": {"family": "clip_vision", "base": "b", "tasks": {"a": {"model": "x", "split": "val", "spilt": 1}}}},
            "download.tasks.a.spilt: unknown task option of family clip_vision",
        ),
        (
            {"download": {"family": "clip_vision", "base": "b", "options": {"pool": 3}, "tasks": {"a": {"model": "x"}}}},
            "download.options.pool: unknown option of family clip_vision",
        ),
        (
            {"download": {"source": "zoo://digits", "family": "clip_vision", "base": "b", "tasks": {"a": {"model": "x"}}}},
            "download.source: give either source",
        ),
        ({"download": {"base": "hf://org/name"}}, "download.base: only with a family"),
    ],
)
def test_bad_params_name_the_key(tmp_path, data, where):
    with pytest.raises(MergeflowError) as exc:
        load_params(write(tmp_path, data))
    msg = str(exc.value)
    assert where in msg and "\n" not in msg and str(tmp_path / "params.yaml") in msg


def test_overrides(tmp_path):
    p = load_params(write(tmp_path, {}), ["compress.drop=0.8", "merge.task_arithmetic.scaling=0.5"])
    assert p.compress.drop == 0.8 and p.merge.hyper("task_arithmetic")["scaling"] == 0.5
    with pytest.raises(MergeflowError, match="compress.drop"):
        load_params(write(tmp_path, {}), ["compress.drop=abc"])


def test_missing_file(tmp_path):
    with pytest.raises(MergeflowError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("a: [1,\n")
    with pytest.raises(MergeflowError, match="not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "merge.methods=[ties_x]"], "merge.methods[0]: unknown method 'ties_x'"),
        (["--set", "compress.drop=2"], "compress.drop"),
        (["--set", "evaluate.nope=1"], "evaluate.nope: unknown key"),
    ],
)
def test_run_refuses_bad_params_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from flows.cli import app

    path = write(tmp_path, {})
    before = path.read_text()
    res = CliRunner().invoke(app, ["run", "--params", str(path), *args])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert path.read_text() == before  # the params file is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no work done, nothing written


def test_run_missing_params_file(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and "params file not found" in res.stderr
