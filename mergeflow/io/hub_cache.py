"""The hub's local cache as huggingface_hub lays it out, read without network, and the environment
that configures it (``HF_HUB_CACHE``, ``HF_HOME``, ``HF_HUB_OFFLINE``), read when called
(huggingface_hub reads it once, at import)."""

from __future__ import annotations

import os
from pathlib import Path

from mergeflow.io.hub_refs import _SHA, DEFAULT_REVISION, _check

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_cache() -> str | None:
    """The hub cache directory from the environment now (None: huggingface_hub's default)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return os.path.join(home, "hub")
    return None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value now."""
    return any(os.environ.get(k, "").strip().upper() in _TRUE for k in OFFLINE_ENV)


def _cache_dir() -> Path:
    if (cache := hub_cache()) is not None:
        return Path(cache).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _storage(repo: str, repo_type: str) -> Path:
    """``<cache>/models--org--name`` (``datasets--org--name``), as huggingface_hub lays it out."""
    return _cache_dir() / "--".join([f"{repo_type}s", *repo.split("/")])


def cache_commit(repo: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The commit the local cache maps ``revision`` to (``refs/<revision>``), if its snapshot is there.

    No network and no huggingface_hub call: None when the repository, the ref or the snapshot
    folder is missing. A revision that is a commit maps to itself when its snapshot is cached.
    """
    _check(repo, repo_type, revision)
    storage = _storage(repo, repo_type)
    revision = revision or DEFAULT_REVISION
    if _SHA.fullmatch(revision):
        commit = revision
    else:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
        if not _SHA.fullmatch(commit):
            return None
    return commit if (storage / "snapshots" / commit).is_dir() else None


def cached_revisions(repo: str, repo_type: str = "model") -> dict[str, str]:
    """The refs (branches, tags) the local cache has for a repository: {revision: commit}."""
    refs = _storage(repo, repo_type) / "refs"
    out = {}
    if refs.is_dir():
        for f in sorted(refs.rglob("*")):
            if f.is_file() and not f.name.endswith(".tmp"):
                try:
                    out[f.relative_to(refs).as_posix()] = f.read_text().strip()
                except OSError:
                    continue
    return out
