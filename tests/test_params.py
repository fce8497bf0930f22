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


@pytest.mark.parametrize(
    "data, where",
    [
        ({"merge": {"methods": ["task_arithmetic"], "task_arithmetic": {"scalling": 1}}}, "merge: task_arithmetic.scalling: unknown"),
        ({"compress": {"drop": 1.5}}, "compress.drop"),
        ({"compress": {"dorp": 0.5}}, "compress.dorp: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"merge": {"methods": ["ta"]}}, "unknown method 'ta'"),
        ({"merge": {"methods": ["tswitch"], "tswitch": {"drop": 0.3}}}, "set compress.drop"),
        ({"seed": -1}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"download": {"zoo": {"n_taks": 3}}}, "unknown zoo option 'n_taks'"),
        ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
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
