"""Hub refs pinned to commits, for models and datasets, served from a Hugging Face cache layout offline.

The cache is the layout huggingface_hub writes and reads (``<cache>/models--org--name/{refs,
snapshots/<commit>, blobs}``); the real ``snapshot_download(local_files_only=True)`` reads it.
The retry tests replace ``huggingface_hub.snapshot_download`` with a fake that fails before any
network, and ``hub._sleep`` with a recorder.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from mergeflow.errors import MergeflowError
from mergeflow.io import hub
from mergeflow.io.sources import resolve_ref
from tests.hfcache import hf_cache

# huggingface_hub's HTTP client: httpx2 for huggingface_hub 2, httpx for 1.
httpx2 = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])

MAIN = "0123456789abcdef0123456789abcdef01234567"
OLD = "89abcdef0123456789abcdef0123456789abcdef"
DS = "fedcba9876543210fedcba9876543210fedcba98"


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline hub cache with a model (main -> MAIN, tag v1 -> OLD) and a dataset."""
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hf_cache(
        root,
        "org/name",
        MAIN,
        {
            "config.json": lambda p: p.write_text('{"model_type": "tiny"}'),
            "model.safetensors": lambda p: save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(p)),
        },
    )
    hf_cache(
        root,
        "org/name",
        OLD,
        {
            "config.json": lambda p: p.write_text('{"model_type": "tiny"}'),
            "model.safetensors": lambda p: save_file({"w": np.zeros((2, 3), dtype=np.float32)}, str(p)),
        },
        refs=("v1",),
    )
    hf_cache(
        root,
        "tanganke/mnist",
        DS,
        {
            "README.md": lambda p: p.write_text("tiny"),
            "data/test-00000-of-00001.parquet": lambda p: pq.write_table(
                pa.table({"image": [b"a", b"b", b"c"], "label": [0, 1, 2]}), p
            ),
        },
        repo_type="dataset",
    )
    return root


def test_model_resolves_to_snapshot_and_commit(cache):
    r = hub.resolve("org/name")
    snap = cache / "models--org--name" / "snapshots" / MAIN
    assert (r.repo, r.repo_type, r.revision, r.commit) == ("org/name", "model", "main", MAIN)
    assert r.path == snap and (r.path / "config.json").is_file()
    assert load_file(str(r.path / "model.safetensors"))["w"][1, 2] == 5
    assert r.ref == "hf://org/name@main" and r.pinned_ref == f"hf://org/name@{MAIN}"
    record = json.loads(json.dumps(r.as_json()))
    assert record == {"ref": "hf://org/name@main", "repo": "org/name", "repo_type": "model", "revision": "main", "commit": MAIN}
    assert r.as_json(with_path=True)["path"] == str(snap)


def test_dataset_resolves_to_snapshot_and_commit(cache):
    r = hub.resolve("tanganke/mnist", "dataset")
    assert (r.repo_type, r.revision, r.commit) == ("dataset", "main", DS)
    assert r.path == cache / "datasets--tanganke--mnist" / "snapshots" / DS
    assert pq.read_table(r.path / "data" / "test-00000-of-00001.parquet").column("label").to_pylist() == [0, 1, 2]
    assert r.ref == "hf://datasets/tanganke/mnist@main"
    # only the files asked for are needed
    assert hub.resolve("tanganke/mnist", "dataset", allow_patterns=["data/*"]).commit == DS


def test_dataset_snapshot_loads_offline(cache, tmp_path):
    """datasets reads the pinned snapshot folder offline (by name it would need its own cache)."""
    datasets = pytest.importorskip("datasets")
    r = hub.resolve("tanganke/mnist", "dataset", allow_patterns=["data/*"])
    ds = datasets.load_dataset(str(r.path), cache_dir=str(tmp_path / "datasets"))
    assert list(ds) == ["test"] and ds["test"]["label"] == [0, 1, 2]


def test_commit_and_tag_revisions(cache):
    for revision, commit in ((OLD, OLD), (MAIN, MAIN), ("v1", OLD), ("main", MAIN)):
        r = hub.resolve("org/name", revision=revision)
        assert (r.revision, r.commit) == (revision, commit)
        assert r.path.name == commit
    assert load_file(str(hub.resolve("org/name", revision="v1").path / "model.safetensors"))["w"].sum() == 0
    assert hub.resolve("tanganke/mnist", "dataset", DS).commit == DS


def test_missing_repo_and_revision_are_one_line(cache):
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("tanganke/missing", "dataset")
    msg = one_line(exc)
    assert msg.startswith("hf://datasets/tanganke/missing@main: not in the local cache")
    assert "offline mode: HF_HUB_OFFLINE=1" in msg and "run once with network access" in msg

    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/missing", revision="v2")
    assert one_line(exc).startswith("hf://org/missing@v2: not in the local cache")

    with pytest.raises(hub.HubError) as exc:
        hub.resolve("org/name", revision="v9")
    msg = one_line(exc)
    assert msg.startswith("hf://org/name@v9: revision 'v9' not in the local cache")
    assert f"main={MAIN[:12]}" in msg and f"v1={OLD[:12]}" in msg
    assert exc.value.ref == "hf://org/name@v9"

    (cache / "models--org--name" / "refs" / "gone").write_text("2" * 40)  # a ref whose snapshot was deleted
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/name", revision="gone")
    assert one_line(exc).startswith(f"hf://org/name@gone: revision 'gone' maps to commit {'2' * 40}, whose snapshot")

    absent = "1" * 40
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/name", revision=absent)
    assert one_line(exc).startswith(f"hf://org/name@{absent}: commit {absent} not in the local cache")


def test_offline_env_read_when_called(cache, tmp_path, monkeypatch):
    other = tmp_path / "other"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    with pytest.raises(MergeflowError, match="not in the local cache"):
        hub.resolve("org/name")
    hf_cache(other, "org/name", OLD, {"model.safetensors": lambda p: save_file({"w": np.ones(1)}, str(p))})
    assert hub.resolve("org/name").commit == OLD
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # HF_HOME/hub
    assert hub.resolve("org/name").commit == MAIN

    seen = []

    def fake(repo_id, **kw):
        seen.append(kw["local_files_only"])
        return str(cache / "models--org--name" / "snapshots" / MAIN)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    hub.resolve("org/name")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    hub.resolve("org/name")
    hub.resolve("org/name", offline=True)
    assert seen == [True, False, True]
    assert hub.hub_offline() is False


def test_torch_weights_only_without_safetensors(cache, monkeypatch):
    hf_cache(
        cache,
        "org/old",
        OLD,
        {
            "config.json": lambda p: p.write_text("{}"),
            "pytorch_model.bin": lambda p: p.write_bytes(b"not really a pickle"),
        },
    )
    calls = []
    real = hub._snapshot_download

    def spy(repo, repo_type, revision, patterns, local_files_only):
        calls.append((revision, patterns))
        return real(repo, repo_type, revision, patterns, local_files_only)

    monkeypatch.setattr(hub, "_snapshot_download", spy)
    assert hub.resolve("org/old").commit == OLD
    # safetensors first; then the torch files, pinned to the commit the first call found
    assert calls == [("main", hub.SAFETENSORS_PATTERNS), (OLD, hub.TORCH_PATTERNS)]
    calls.clear()
    hub.resolve("org/name")
    assert calls == [("main", hub.SAFETENSORS_PATTERNS)]

    hf_cache(cache, "org/empty", MAIN, {"config.json": lambda p: p.write_text("{}")})
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/empty")
    assert one_line(exc).startswith(f"hf://org/empty@main: the cached snapshot {MAIN} has no weights")


def test_parse_ref():
    assert hub.parse_ref("hf://org/name") == ("model", "org/name", None)
    assert hub.parse_ref("hf://org/name@v1.0") == ("model", "org/name", "v1.0")
    assert hub.parse_ref(f"hf://Org-x/na_me.2@{MAIN}") == ("model", "Org-x/na_me.2", MAIN)
    assert hub.parse_ref("hf://datasets/tanganke/mnist") == ("dataset", "tanganke/mnist", None)
    assert hub.parse_ref("hf://datasets/tanganke/mnist@refs/convert/parquet") == (
        "dataset",
        "tanganke/mnist",
        "refs/convert/parquet",
    )
    for ref in (
        "hf://justname",
        "hf://a/b/c",
        "hf://org/name@",
        "org/name",
        "hf://datasets/mnist",
        "hf://datasets/a/b/c",
        "hf://org/na me",
        "hf://org/",
        "hf:///name",
        "hf://org/name@a b",
        "hf://org/name@../../x",
        "hf://../name",
        "hf://models/org/name",
        "",
    ):
        with pytest.raises(MergeflowError) as exc:
            hub.parse_ref(ref)
        assert "expected hf://org/name[@revision] or hf://datasets/org/name[@revision]" in one_line(exc), ref
    with pytest.raises(MergeflowError, match="repo_type must be one of model, dataset"):
        hub.resolve("org/name", "space")
    with pytest.raises(MergeflowError, match="expected a repository id"):
        hub.resolve("name")


def test_resolve_ref_goes_through_hub(cache):
    snap = cache / "models--org--name" / "snapshots"
    assert resolve_ref("hf://org/name") == snap / MAIN
    assert resolve_ref("hf://org/name@v1") == snap / OLD
    with pytest.raises(MergeflowError) as exc:
        resolve_ref("hf://org/name@v9")
    assert one_line(exc).startswith("hf://org/name@v9: cannot resolve org/name@v9 (revision 'v9' not in the local cache")
    with pytest.raises(MergeflowError, match="a dataset, not a checkpoint"):
        resolve_ref("hf://datasets/tanganke/mnist")


def test_cache_commit(cache):
    assert hub.cache_commit("org/name") == MAIN
    assert hub.cache_commit("org/name", "model", "v1") == OLD
    assert hub.cache_commit("org/name", revision=OLD) == OLD
    assert hub.cache_commit("tanganke/mnist", "dataset") == DS
    assert hub.cache_commit("tanganke/mnist", "model") is None
    assert hub.cache_commit("org/name", revision="v9") is None
    assert hub.cache_commit("org/name", revision="1" * 40) is None
    assert hub.cache_commit("org/missing") is None
    (cache / "models--org--name" / "refs" / "gone").write_text("2" * 40)  # ref to a snapshot not there
    assert hub.cache_commit("org/name", revision="gone") is None
    assert hub.cached_revisions("org/name") == {"gone": "2" * 40, "main": MAIN, "v1": OLD}


# --- retries, with a fake snapshot_download that fails before any network -----------------------


def http_error(cls, status):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


def local_entry_from(cause):
    """What snapshot_download raises when the hub cannot be reached and the cache lacks the repo."""
    try:
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from cause
    except LocalEntryNotFoundError as exc:
        return exc


@pytest.fixture
def flaky(cache, monkeypatch):
    """snapshot_download raising the given errors in turn, then the cached snapshot; sleeps recorded."""
    state = {"errors": [], "calls": 0, "sleeps": []}

    def fake(repo_id, **kw):
        state["calls"] += 1
        assert kw["local_files_only"] is False
        if state["errors"]:
            raise state["errors"].pop(0)
        return str(cache / "models--org--name" / "snapshots" / MAIN)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.setattr(hub, "_sleep", state["sleeps"].append)
    return state


@pytest.mark.parametrize(
    "make",
    [
        lambda: requests.ConnectionError("connection reset"),
        lambda: httpx2.ConnectError("connection refused"),
        lambda: httpx2.ReadTimeout("read timed out"),
        lambda: http_error(HfHubHTTPError, 503),
        lambda: http_error(HfHubHTTPError, 429),
        lambda: local_entry_from(httpx2.ConnectError("name resolution failed")),
    ],
)
def test_transient_errors_are_retried(flaky, make):
    flaky["errors"] = [make(), make()]
    r = hub.resolve("org/name", offline=False, retries=3, backoff=0.5)
    assert r.commit == MAIN
    assert flaky["calls"] == 3 and flaky["sleeps"] == [0.5, 1.0]


def test_gives_up_after_retries(flaky):
    flaky["errors"] = [http_error(HfHubHTTPError, 503) for _ in range(10)]
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/name", revision="v1", offline=False, retries=3, backoff=1.0)
    msg = one_line(exc)
    assert msg.startswith("hf://org/name@v1: hub unreachable after 4 attempts (HfHubHTTPError: 503 error)")
    assert flaky["calls"] == 4 and flaky["sleeps"] == [1.0, 2.0, 4.0]

    flaky.update(errors=[httpx2.ConnectError("down")] * 2, calls=0, sleeps=[])
    with pytest.raises(MergeflowError, match=r"^hf://datasets/a/b@main: hub unreachable after 1 attempt \("):
        hub.resolve("a/b", "dataset", offline=False, retries=0)
    assert flaky["calls"] == 1 and flaky["sleeps"] == []


@pytest.mark.parametrize(
    "error, message",
    [
        (http_error(RepositoryNotFoundError, 404), "model repository org/name not found"),
        (http_error(RevisionNotFoundError, 404), "revision 'main' not found"),
        (http_error(HfHubHTTPError, 401), "access refused (HTTP 401)"),
        (local_entry_from(OfflineModeIsEnabled("offline")), "not in the local cache"),
        (ValueError("bad argument"), "cannot resolve (ValueError: bad argument)"),
    ],
)
def test_permanent_errors_are_not_retried(flaky, error, message):
    flaky["errors"] = [error]
    with pytest.raises(MergeflowError) as exc:
        hub.resolve("org/name", offline=False)
    msg = one_line(exc)
    assert msg.startswith("hf://org/name@main: ") and message in msg, msg
    assert flaky["calls"] == 1 and flaky["sleeps"] == []


def test_not_a_snapshot_folder(cache, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: str(cache / "somewhere"))
    with pytest.raises(MergeflowError, match=r"^hf://org/name@main: resolved to .*somewhere, not a snapshots/"):
        hub.resolve("org/name")


def test_subfolder_limits_a_model_to_one_folder(cache):
    """One repo, a checkpoint per folder: the subfolder's weights make the snapshot, safetensors first."""
    commit = "abcabcabcabcabcabcabcabcabcabcabcabcabca"
    hf_cache(
        cache,
        "org/multi",
        commit,
        {
            "a/config.json": lambda p: p.write_text("{}"),
            "a/model.safetensors": lambda p: save_file({"w": np.ones(2, dtype=np.float32)}, str(p)),
            "b/config.json": lambda p: p.write_text("{}"),
            "b/pytorch_model.bin": lambda p: p.write_bytes(b"not read here"),
            "c/config.json": lambda p: p.write_text("{}"),
        },
    )
    for folder in ("a", "b", "b/"):
        r = hub.resolve("org/multi", subfolder=folder)
        assert r.commit == commit and r.path.name == commit
    with pytest.raises(hub.HubError) as exc:
        hub.resolve("org/multi", subfolder="c")
    assert "has no weights" in one_line(exc)
