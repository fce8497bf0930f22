"""Local sources in params (issue 17, friction 4): a relative path starts at the params file's
folder (the workspace), wherever the command runs; a missing one says so in one line."""

from __future__ import annotations

import pytest

from mergeflow.errors import MergeflowError


def params(tmp_path, base: str = "models/base"):
    from mergeflow.params import validate

    for folder in ("models/base", "models/sst", "data/sst"):
        (tmp_path / "ws" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "ws" / folder / "x.bin").write_bytes(folder.encode())
    tasks = {"sst": {"model": "models/sst", "dataset": "data/sst", "text_columns": ["text"]}}
    return validate({"download": {"family": "text_classification", "base": base, "tasks": tasks}})


def test_relative_sources_start_at_the_workspace(tmp_path, monkeypatch):
    from mergeflow.stages import preflight
    from mergeflow.stages.download import fingerprint, resolve_sources, upstream_state

    p = params(tmp_path)
    ws = tmp_path / "ws"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    preflight(p, ws)
    sources, pins = resolve_sources(p, root=ws)
    assert (
        sources.base.path == (ws / "models/base").resolve() and sources.tasks["sst"].dataset.path == (ws / "data/sst").resolve()
    )
    assert pins["base"] == {
        "ref": "models/base",
        "path": str((ws / "models/base").resolve()),
        "sha256": fingerprint(ws / "models/base"),
    }
    state = upstream_state(p, root=ws)
    assert state["base"] == fingerprint(ws / "models/base") and state["tasks"]["sst"] == [
        fingerprint(ws / "models/sst"),
        fingerprint(ws / "data/sst"),
    ]


def test_a_missing_relative_source_names_where_it_was_looked_for(tmp_path):
    from mergeflow.stages.download import resolve_sources

    p = params(tmp_path, base="models/nope")
    with pytest.raises(MergeflowError) as exc:
        resolve_sources(p, root=tmp_path / "ws")
    assert str(exc.value) == (
        "params: download.base: models/nope: no such file or folder (and not an hf:// ref) "
        f"(relative paths start at the params file's folder, {tmp_path / 'ws'})"
    )
