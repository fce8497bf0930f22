"""Hub failures: which are transient (worth retrying) and which permanent, and the one-line
explanation a :class:`~mergeflow.io.hub_refs.HubError` carries (see :mod:`mergeflow.io.hub`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterator

from mergeflow.io.hub_cache import _TRUE, OFFLINE_ENV, _cache_dir, _storage, cached_revisions
from mergeflow.io.hub_refs import _SHA


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_permanent(exc: BaseException) -> bool:
    name = type(exc).__name__
    if name in (
        "OfflineModeIsEnabled",
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "DisabledRepoError",
        "RemoteEntryNotFoundError",
        "EntryNotFoundError",
        "HFValidationError",
        "LocalTokenNotFoundError",
        "ProxyError",
        "UnsupportedProtocol",
        "InvalidURL",
    ):
        return True
    status = _status(exc)
    return status is not None and status < 500 and status != 429


def _is_transient_one(exc: BaseException) -> bool:
    status = _status(exc)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for mod in ("httpx2", "httpx"):
        m = _loaded(mod)
        if m is not None and isinstance(exc, (m.TransportError,)):
            return True
    requests = _loaded("requests")
    if requests is not None and isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    return False


def _loaded(module: str):
    """A module if it is already imported: an exception of its types can only come from it then."""
    return sys.modules.get(module)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a connection error, a timeout or HTTP 429/5xx, here or as a cause.

    huggingface_hub wraps an unreachable hub in ``LocalEntryNotFoundError`` raised from the
    connection error, so the chain of causes is followed; a missing repository or revision, an
    auth failure or offline mode anywhere in it is never transient.
    """
    for e in _chain(exc):
        if _is_permanent(e):
            return False
        if _is_transient_one(e):
            return True
    return False


@dataclass
class _Ctx:
    ref: str
    repo: str
    repo_type: str
    revision: str
    offline: bool
    explicit: bool
    attempts: int

    def offline_reason(self) -> str:
        if self.explicit:
            return "offline mode"
        env = [f"{k}={os.environ[k]}" for k in OFFLINE_ENV if os.environ.get(k, "").strip().upper() in _TRUE]
        return "offline mode: " + ", ".join(env) if env else "offline mode"

    def offline_hint(self) -> str:
        return "run once with network access or pre-download it"

    def explain(self, exc: BaseException, attempts: int) -> str:
        chain = list(_chain(exc))
        names = {type(e).__name__ for e in chain}
        status = next((s for s in map(_status, chain) if s is not None), None)
        rev = self.revision
        if "RevisionNotFoundError" in names:
            return f"revision {rev!r} not found"
        if "GatedRepoError" in names:
            return f"gated {self.repo_type} repository: ask for access on the Hub and log in (HF_TOKEN)"
        if "RepositoryNotFoundError" in names:
            return f"{self.repo_type} repository {self.repo} not found (or private: log in with HF_TOKEN)"
        if "DisabledRepoError" in names:
            return f"{self.repo_type} repository {self.repo} is disabled"
        if status in (401, 403):
            return f"access refused (HTTP {status}); log in with HF_TOKEN"
        if "IncompleteSnapshotError" in names:
            return f"the cached snapshot is incomplete ({_short(exc)}); {self.offline_hint()}"
        if is_transient(exc):
            return (
                f"hub unreachable after {attempts} attempt{'s' * (attempts > 1)} "
                f"({type(_root(exc)).__name__}: {_short(_root(exc))})"
            )
        if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
            return self.missing_from_cache("OfflineModeIsEnabled" in names and not self.offline)
        return f"cannot resolve ({type(exc).__name__}: {_short(exc)})"

    def missing_from_cache(self, offline_at_import: bool) -> str:
        """What the local cache lacks: the repository, the ref, or the commit's snapshot."""
        if offline_at_import:
            why = "huggingface_hub was imported with HF_HUB_OFFLINE set"
        else:
            why = self.offline_reason() if self.offline else "the hub could not be reached"
        storage = _storage(self.repo, self.repo_type)
        rev = self.revision
        refs = cached_revisions(self.repo, self.repo_type)
        have = f"; cached: {', '.join(f'{r}={c[:12]}' for r, c in refs.items())}" if refs else ""
        if not storage.is_dir():
            what, have = f"not in the local cache {_cache_dir()}", ""
        elif _SHA.fullmatch(rev):
            what = f"commit {rev} not in the local cache"
        elif rev not in refs:
            what = f"revision {rev!r} not in the local cache"
        else:
            what, have = f"revision {rev!r} maps to commit {refs[rev]}, whose snapshot is not in the local cache", ""
        return f"{what} ({why}{have}); {self.offline_hint()}"


def _root(exc: BaseException) -> BaseException:
    """The innermost transient error in the chain (what actually failed)."""
    found = exc
    for e in _chain(exc):
        if _is_transient_one(e):
            found = e
    return found


def _short(exc: BaseException, n: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[: n - 3] + "..."
