"""The one staleness truth: mergeflow/stages/spec.py's table, dvc.yaml generated from it, and the
code each stage runs (its module and what it imports, never another stage's module)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeflow.stages import STAGES, spec

ROOT = Path(__file__).resolve().parents[2]


def _rel(files) -> set[str]:
    return {f.relative_to(spec.PACKAGE.parent).as_posix() for f in files}


def test_dvc_yaml_is_the_table():
    assert (ROOT / "dvc.yaml").read_text() == spec.dvc_yaml(), "dvc.yaml is stale: python -m mergeflow.stages.spec"


def test_dvc_yaml_says_what_each_stage_reads_and_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, st in stages.items():
        assert st["cmd"] == f"mergeflow stage {name}"
        assert st["params"] == list(spec.SPEC[name].params)
        code = {d for d in st["deps"] if d.startswith("mergeflow/")}
        assert code == set(spec.code_deps(name))
        listed = {f for f in _rel(spec.code_files(name)) if not f.startswith("mergeflow/methods/")}
        assert listed == {d for d in code if d != "mergeflow/methods"}
        assert "mergeflow/methods" in code  # a folder: a new method file is a dep without editing dvc.yaml
        assert f"mergeflow/stages/{name}.py" in code
        assert not {f"mergeflow/stages/{other}.py" for other in STAGES if other != name} & code


def test_upstream_follows_what_is_read():
    assert spec.upstream("download") == []
    assert spec.upstream("extract") == ["download"]
    assert spec.upstream("compress") == ["download", "extract"]
    assert spec.upstream("merge") == ["download", "extract", "compress"]
    assert spec.upstream("evaluate") == ["download", "compress", "merge"]


def test_code_follows_imports_in_functions_and_module_tables():
    download = _rel(spec.code_files("download"))
    assert "mergeflow/zoo.py" in download  # imported inside a function
    assert {"mergeflow/models/vision.py", "mergeflow/models/text.py", "mergeflow/models/causal.py"} <= download  # by name
    assert "mergeflow/methods/ties.py" in _rel(spec.code_files("merge"))
    everything = set().union(*(_rel(spec.code_files(s)) for s in STAGES))
    assert "mergeflow/cli.py" not in everything and "mergeflow/io/lock.py" not in everything


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the mergeflow package that spec reads instead of the real one."""
    import shutil

    copy = tmp_path / "mergeflow"
    shutil.copytree(spec.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(spec, "PACKAGE", copy)
    spec.code_files.cache_clear()
    yield copy
    spec.code_files.cache_clear()


def test_the_digest_moves_with_the_code_only(package_copy):
    copy = package_copy
    before = {s: spec.code_digest(s) for s in STAGES}
    (copy / "stages" / "merge.py").write_text((copy / "stages" / "merge.py").read_text() + "# a comment\n")
    (copy / "cli.py").write_text((copy / "cli.py").read_text() + "# a comment\n")
    spec.code_files.cache_clear()
    after = {s: spec.code_digest(s) for s in STAGES}
    assert [s for s in STAGES if before[s] != after[s]] == ["merge"]


def test_a_new_method_file_is_part_of_every_stage_that_loads_the_registry(package_copy):
    before = {s: spec.code_digest(s) for s in STAGES}
    (package_copy / "methods" / "new_method.py").write_text('"""A new method."""\n')
    spec.code_files.cache_clear()
    files = {s: _rel(spec.code_files(s)) for s in STAGES}
    after = {s: spec.code_digest(s) for s in STAGES}
    deps = {s: spec.code_deps(s) for s in STAGES}
    loading = [s for s in STAGES if "mergeflow/methods/__init__.py" in files[s]]
    assert loading == list(STAGES)  # every stage validates params.yaml, which loads the registry
    assert [s for s in STAGES if before[s] != after[s]] == loading
    assert all("mergeflow/methods/new_method.py" in files[s] for s in loading)
    assert all("mergeflow/methods" in deps[s] and not any(d.startswith("mergeflow/methods/") for d in deps[s]) for s in loading)
