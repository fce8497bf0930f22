"""Artifacts through a DVC remote (tasks/transfer.py), without Prefect: what a worker adds and
pushes comes back whole through ``pull`` (files, bytes, empty folders), a worker's copy pulls an
input only when its hash or its files changed, and a hash the remote lacks is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir
from mergeflow.io.outputs import MARKER
from tasks import transfer as tr


def _dotfiles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*"))


def _tree(root: Path) -> dict[str, bytes | None]:
    return {f.relative_to(root).as_posix(): f.read_bytes() if f.is_file() else None for f in sorted(root.rglob("*"))}


@pytest.fixture
def remote_and_source(tmp_path):
    """A worker-like repository (no git) holding artifacts/merged with a nested and an empty
    folder and artifacts/sources.json, both added and pushed to a local remote."""
    remote = tmp_path / "remote"
    src = tmp_path / "src"
    merged = src / "artifacts" / "merged"
    tr.prepare_worker(src, str(remote), {}, {})  # dvc init --no-scm + the remote
    with atomic_dir(merged, kind="stage:merge") as tmp:  # as the merge stage writes it
        (tmp / "tswitch").mkdir()
        (tmp / "plots").mkdir()
        (tmp / "a.safetensors").write_bytes(bytes(range(256)) * 4)
        (tmp / "tswitch" / "b.json").write_text('{"x": 1}\n')
    (src / "artifacts" / "sources.json").write_text('{"tasks": ["t0"]}\n')
    outs = [merged, src / "artifacts" / "sources.json"]
    hashes = tr.add_and_push(src, outs, tr.REMOTE)
    return remote, src, hashes, tr.empty_dirs(src, outs)


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_pushed_outputs_come_back_whole(remote_and_source, tmp_path):
    remote, src, hashes, dirs = remote_and_source
    assert set(hashes) == {"artifacts/merged", "artifacts/sources.json"}
    assert hashes["artifacts/merged"].endswith(".dir") and not hashes["artifacts/sources.json"].endswith(".dir")
    assert dirs == ["artifacts/merged/plots"]
    dst = tmp_path / "dst"
    tr.prepare_worker(dst, str(remote), {}, {})
    with atomic_dir(dst / "artifacts" / "merged", kind="stage:merge") as tmp:  # an older output: replaced whole
        (tmp / "stale.bin").write_bytes(b"old")
    tr.pull(dst, hashes, tr.REMOTE, "pulling", dirs)
    assert _tree(dst / "artifacts" / "merged") == _tree(src / "artifacts" / "merged")
    assert (dst / "artifacts" / "sources.json").read_bytes() == (src / "artifacts" / "sources.json").read_bytes()
    assert _dotfiles(dst / "artifacts") == [MARKER]  # no scratch folder, no moved-aside old output
    (dst / "artifacts" / "merged" / "notes.txt").write_text("mine")
    with pytest.raises(MergeflowError, match="notes.txt, which mergeflow did not write"):
        tr.pull(dst, hashes, tr.REMOTE, "pulling", dirs)
    assert (dst / "artifacts" / "merged" / "notes.txt").read_text() == "mine"


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_worker_copy_pulls_only_what_changed(remote_and_source, tmp_path):
    remote, src, hashes, dirs = remote_and_source
    stamps = {"download": {"fingerprint": "f", "outs": "o", "summary": {}, "pid": 1}}
    copy = tmp_path / "copy"
    tr.prepare_worker(copy, str(remote), hashes, stamps, dirs)
    assert _tree(copy / "artifacts" / "merged") == _tree(src / "artifacts" / "merged")
    from tasks.cache import read_stamp

    assert read_stamp(copy, "download") == stamps["download"]
    f = copy / "artifacts" / "merged" / "a.safetensors"
    ino = f.stat().st_ino
    tr.prepare_worker(copy, str(remote), hashes, stamps, dirs)  # same hashes, files untouched: nothing pulled
    assert f.stat().st_ino == ino
    f.write_bytes(b"tampered")  # the copy's files changed: pulled again, content restored
    tr.prepare_worker(copy, str(remote), hashes, stamps, dirs)
    assert f.read_bytes() == (src / "artifacts" / "merged" / "a.safetensors").read_bytes()


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_a_hash_the_remote_lacks_is_one_line(remote_and_source, tmp_path, monkeypatch):
    remote, _, hashes, _ = remote_and_source
    monkeypatch.setattr(tr, "RETRY_DELAYS", ())
    dst = tmp_path / "dst"
    tr.prepare_worker(dst, str(remote), {}, {})
    with pytest.raises(MergeflowError) as err:
        tr.pull(dst, {"artifacts/merged": "0" * 32 + ".dir"}, tr.REMOTE, "pulling the outputs of merge")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("pulling the outputs of merge failed in ") and "dvc pull" in msg
    assert not (dst / "artifacts" / "merged").exists() and _dotfiles(dst / "artifacts") == [MARKER]


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_remote_url_is_resolved_and_a_missing_remote_named(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "team", "../store"], cwd=ws, check=True)
    assert tr.remote_url(ws, "team") == str((tmp_path / "store").resolve())
    with pytest.raises(MergeflowError, match=r"^params: run.dvc_remote: no DVC remote 'other' in "):
        tr.remote_url(ws, "other")


def test_worker_root_is_per_parent_workspace(tmp_path):
    a = tr.worker_root(str(tmp_path), "exp", "host:/a")
    assert a == tr.worker_root(str(tmp_path), "exp", "host:/a") and a.parent == tmp_path and a.name.startswith("exp-")
    assert a != tr.worker_root(str(tmp_path), "exp", "host:/b") != tr.worker_root(str(tmp_path), "exp", "other:/a")
