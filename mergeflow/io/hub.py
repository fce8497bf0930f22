"""Hugging Face Hub repositories, models and datasets, resolved to the commit they point at.

``resolve("org/name", "model", "main")`` gives a :class:`Resolved`: the local snapshot folder
and the 40-hex commit it holds (``<cache>/models--org--name/snapshots/<commit>`` in
huggingface_hub's cache), so what ran can be pinned in sources.json. Refs (``hub_refs``):
``hf://org/name[@revision]`` (a model) and ``hf://datasets/org/name[@revision]``. Environment
(``hub_cache``), read when called (huggingface_hub reads it once, at import): ``HF_HUB_CACHE``
(or ``HUGGINGFACE_HUB_CACHE``, or ``HF_HOME``/hub); ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
for offline mode, where only the local cache is used. Transient failures (connection errors,
timeouts, HTTP 429 and 5xx) are retried with exponential backoff; a missing repository or
revision, or a refused token, is not (``hub_failures``). Every failure is a one-line
:class:`HubError` (a ``MergeflowError``) starting with the ref, e.g. ``hf://datasets/org/name@main:
not in the local cache (offline mode: HF_HUB_OFFLINE=1); ...``. huggingface_hub is imported only
when something has to be downloaded or looked up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TypeVar

from mergeflow.errors import MergeflowError
from mergeflow.io.hub_cache import OFFLINE_ENV, cache_commit, cached_revisions, hub_cache, hub_offline
from mergeflow.io.hub_failures import _Ctx, is_transient
from mergeflow.io.hub_refs import _SHA, DEFAULT_REVISION, REPO_TYPES, HubError, RepoType, Resolved, _check, format_ref, parse_ref

__all__ = [
    "CHECKPOINT_FILE_PATTERNS",
    "DEFAULT_REVISION",
    "OFFLINE_ENV",
    "REPO_TYPES",
    "SAFETENSORS_PATTERNS",
    "TORCH_PATTERNS",
    "WEIGHT_SUFFIXES",
    "HubError",
    "RepoType",
    "Resolved",
    "cache_commit",
    "cached_revisions",
    "format_ref",
    "head_commit",
    "hub_cache",
    "hub_offline",
    "is_transient",
    "parse_ref",
    "resolve",
]

# Model checkpoints: configs and tokenizer files, then safetensors weights; torch pickles only
# for a repo that has no safetensors at all.
CHECKPOINT_FILE_PATTERNS = ["*.json", "*.txt", "*.model"]
SAFETENSORS_PATTERNS = [*CHECKPOINT_FILE_PATTERNS, "*.safetensors"]
TORCH_PATTERNS = [*CHECKPOINT_FILE_PATTERNS, "*.bin", "*.pt", "*.pth"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_sleep = time.sleep  # tests replace it

T = TypeVar("T")


def head_commit(
    repo: str,
    repo_type: RepoType = "model",
    revision: str | None = None,
    *,
    offline: bool | None = None,
    retries: int = 3,
    backoff: float = 1.0,
) -> str | None:
    """The commit ``revision`` points at now, without downloading: the hub's answer online (retried
    on transient errors), the local cache's offline (None when it has no snapshot for it).

    What a scheduled run compares with the commits it pinned last time to know whether anything
    upstream changed."""
    ref = _check(repo, repo_type, revision)
    asked = revision or DEFAULT_REVISION
    is_offline = hub_offline() if offline is None else bool(offline)
    if is_offline:
        return cache_commit(repo, repo_type, asked)
    ctx = _Ctx(ref, repo, repo_type, asked, is_offline, explicit=offline is not None, attempts=1 + max(0, int(retries)))

    def ask() -> str:
        import huggingface_hub

        return huggingface_hub.HfApi().repo_info(repo, repo_type=repo_type, revision=asked).sha

    try:
        return _retrying(ask, 1 + max(0, int(retries)), backoff)
    except _GaveUp as exc:
        raise HubError(ref, ctx.explain(exc.error, exc.attempts)) from None
    except Exception as exc:  # noqa: BLE001 - translated to one line
        raise HubError(ref, ctx.explain(exc, 1)) from None


def resolve(
    repo: str,
    repo_type: RepoType = "model",
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    *,
    offline: bool | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    subfolder: str | None = None,
) -> Resolved:
    """Download (or find in the local cache) a snapshot of ``repo`` at ``revision``, pinned to its commit.

    ``revision`` defaults to "main"; a 40-hex commit pins itself. For a model and no
    ``allow_patterns``, configs, tokenizer files and ``*.safetensors`` are fetched, and torch
    ``.bin``/``.pt``/``.pth`` weights only for a repository with no safetensors; a snapshot without
    weights is an error. A dataset without ``allow_patterns`` is fetched whole.

    ``offline`` None: offline when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now; offline
    uses only the local cache. Online, transient failures are retried ``retries`` times after the
    first attempt, sleeping ``backoff * 2**i`` seconds before retry ``i + 1``. ``subfolder`` limits a
    model's default patterns to that folder of the repo (one repo holding several checkpoints);
    ``path`` stays the snapshot's root.
    """
    ref = _check(repo, repo_type, revision)
    asked = revision or DEFAULT_REVISION
    is_offline = hub_offline() if offline is None else bool(offline)
    attempts = 1 if is_offline else 1 + max(0, int(retries))
    ctx = _Ctx(ref, repo, repo_type, asked, is_offline, explicit=offline is not None, attempts=attempts)

    def fetch(rev: str, patterns) -> Path:
        return Path(_retrying(lambda: _snapshot_download(repo, repo_type, rev, patterns, is_offline), attempts, backoff))

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        if repo_type == "model" and allow_patterns is None:
            path = fetch(asked, [prefix + p for p in SAFETENSORS_PATTERNS])
            if not _has(path / prefix, (".safetensors",)):
                # The same commit again, so a branch moving in between cannot mix two commits.
                commit = path.name if _SHA.fullmatch(path.name) else asked
                path = fetch(commit, [prefix + p for p in TORCH_PATTERNS])
        else:
            path = fetch(asked, allow_patterns)
    except _GaveUp as exc:
        raise HubError(ref, ctx.explain(exc.error, exc.attempts)) from None
    except Exception as exc:  # noqa: BLE001 - translated to one line
        if isinstance(exc, MergeflowError):
            raise
        raise HubError(ref, ctx.explain(exc, 1)) from None

    commit = path.name
    if not (_SHA.fullmatch(commit) and path.parent.name == "snapshots"):
        raise HubError(ref, f"resolved to {path}, not a snapshots/<40-hex commit> folder of the hub cache")
    if _SHA.fullmatch(asked) and commit != asked:
        raise HubError(ref, f"asked for commit {asked} but the cache gave {commit}")
    if repo_type == "model" and allow_patterns is None and not _has(path / prefix, WEIGHT_SUFFIXES):
        where = "the cached snapshot" if is_offline else "the snapshot"
        raise HubError(
            ref,
            f"{where} {commit} has no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
            f" in {path}" + (f"; {ctx.offline_hint()}" if is_offline else ""),
        )
    return Resolved(repo=repo, repo_type=repo_type, revision=asked, commit=commit, path=path)


def _has(path: Path, suffixes: tuple[str, ...]) -> bool:
    return any(p.name.endswith(suffixes) for p in path.rglob("*") if p.is_file())


def _snapshot_download(repo: str, repo_type: str, revision: str, allow_patterns, local_files_only: bool) -> str:
    import huggingface_hub  # looked up on the module each call, so tests can replace it

    return huggingface_hub.snapshot_download(
        repo,
        repo_type=repo_type,
        revision=revision,
        allow_patterns=allow_patterns,
        cache_dir=hub_cache(),
        local_files_only=local_files_only,
    )


class _GaveUp(Exception):
    def __init__(self, error: BaseException, attempts: int):
        super().__init__(str(error))
        self.error, self.attempts = error, attempts


def _retrying(call: Callable[[], T], attempts: int, backoff: float) -> T:
    """``call()``, tried up to ``attempts`` times while it fails transiently; sleeps double each time."""
    for i in range(attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            if not is_transient(exc):
                raise
            if i + 1 >= attempts:
                raise _GaveUp(exc, attempts) from exc
            _sleep(backoff * 2**i)
    raise AssertionError("unreachable")
