"""The ownership rule (mergeflow/io/outputs.py) through the atomic writers every output uses."""

from __future__ import annotations

import json

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir, atomic_file, replace_whole, write_text
from mergeflow.io.outputs import MARKER, check_apart, keep_tree, read_marker
from mergeflow.stages import Layout


def _out(path, files: dict[str, str], kind: str = "checkpoint"):
    with atomic_dir(path, kind=kind) as tmp:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
    return path


def test_marker_lists_exactly_what_was_written(tmp_path):
    out = _out(tmp_path / "o", {"a.txt": "1", "sub/b.txt": "2"})
    (out / "empty").mkdir()  # added afterwards: not listed, so the folder is no longer replaceable
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"writer": "mergeflow", "kind": "checkpoint", "files": ["a.txt", "sub/b.txt"]}
    with pytest.raises(MergeflowError, match="holds empty/, which mergeflow did not write"):
        _out(out, {"c.txt": "3"})
    (out / "empty").rmdir()
    _out(out, {"c.txt": "3"})
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "c.txt"]


def test_markers_are_deterministic(tmp_path):
    a = _out(tmp_path / "a", {"x": "1", "y/z": "2"})
    b = _out(tmp_path / "b", {"y/z": "2", "x": "1"})
    assert (a / MARKER).read_bytes() == (b / MARKER).read_bytes()


def test_kinds_do_not_replace_each_other(tmp_path):
    out = _out(tmp_path / "o", {"m.json": "{}"}, kind="stage:merge")
    with pytest.raises(MergeflowError, match="stage:merge output, not a checkpoint one"):
        _out(out, {"model.safetensors": ""})
    _out(out, {"m.json": "[]"}, kind="stage:merge")


def test_a_forged_or_foreign_marker_is_not_mergeflows(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("mine")
    (d / MARKER).write_text(json.dumps({"writer": "someone else", "kind": "checkpoint", "files": ["f"]}))
    assert read_marker(d) is None
    with pytest.raises(MergeflowError, match="not a mergeflow output"):
        _out(d, {"g": "1"})
    assert (d / "f").read_text() == "mine"


def test_files_are_replaced_only_inside_mergeflow_trees(tmp_path):
    f = tmp_path / "notes.json"
    f.write_text("mine")
    with pytest.raises(MergeflowError, match="not written by mergeflow"):
        write_text(f, "{}")
    assert f.read_text() == "mine"
    tree = keep_tree(tmp_path / "state")
    write_text(tree / "deep" / "stamp.json", "1")
    write_text(tree / "deep" / "stamp.json", "2")  # a tree mergeflow keeps: its files are mergeflow's
    assert (tree / "deep" / "stamp.json").read_text() == "2"
    with atomic_file(f, user_file=True) as tmp:  # the one exception: a user's file edited on request
        tmp.write_text("edited")
    assert f.read_text() == "edited"


def test_replace_whole_refuses_a_file_for_a_folder_and_back(tmp_path):
    src = tmp_path / "new"
    src.mkdir()
    target = tmp_path / "t"
    target.write_text("x")
    with pytest.raises(MergeflowError, match="is a file, and this output is a folder"):
        replace_whole(src, target)
    assert target.read_text() == "x" and src.is_dir()


def test_apart_catches_links_into_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w").write_text("1")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "w").symlink_to(model / "w")
    with pytest.raises(MergeflowError, match="contains the input"):
        check_apart(tmp_path, [link_dir])
    with pytest.raises(MergeflowError, match="contains the input"):
        check_apart(tmp_path / "model", [link_dir])  # the folder a link of the input leads into
    check_apart(tmp_path / "elsewhere", [link_dir, model])


def test_workspace_artifacts_restored_by_dvc_are_adopted(tmp_path):
    """A clone's `dvc pull` brings the stage outputs (each with its marker) but not artifacts/'s own
    marker: the workspace is still recognised; anything else in artifacts/ is not."""
    lay = Layout(tmp_path)
    lay.artifacts.mkdir()
    _out(lay.merged, {"method.json": "{}"}, kind="stage:merge")
    lay.sources.write_text("{}")
    (lay.artifacts / ".gitignore").write_text("/merged\n")
    lay.claim()
    assert read_marker(lay.artifacts)["kind"] == "tree"
    write_text(lay.sources, '{"tasks": []}')

    other = Layout(tmp_path / "other")
    other.artifacts.mkdir(parents=True)
    other.sources.write_text("{}")
    (other.artifacts / "mine").mkdir()
    with pytest.raises(MergeflowError, match="sources.json: exists and was not written by mergeflow"):
        other.claim()
    assert read_marker(other.artifacts) is None
