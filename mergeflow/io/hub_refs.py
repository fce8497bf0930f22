"""Hub refs: ``hf://org/name[@revision]`` (a model) and ``hf://datasets/org/name[@revision]``
parsed and checked, the :class:`Resolved` record of what a ref resolved to, and
:class:`HubError`, the one-line failure every hub function raises (see :mod:`mergeflow.io.hub`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergeflow.errors import MergeflowError

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[str, ...] = ("model", "dataset")
DEFAULT_REVISION = "main"
_SHA = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_REF_FORM = "expected hf://org/name[@revision] or hf://datasets/org/name[@revision]"


class HubError(MergeflowError):
    """A hub ref that cannot be resolved: ``"<ref>: <reason>"`` on one line."""

    def __init__(self, ref: str, reason: str):
        self.ref = ref
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{ref}: {self.reason}")


@dataclass(frozen=True)
class Resolved:
    """A hub repository at the commit a revision resolved to, and its local snapshot folder."""

    repo: str
    repo_type: RepoType
    revision: str  # what was asked: a branch, a tag or a commit
    commit: str  # the 40-hex commit it resolved to
    path: Path  # the snapshot folder in the local cache

    @property
    def ref(self) -> str:
        """The ref as asked, ``hf://[datasets/]org/name@revision``."""
        return format_ref(self.repo, self.repo_type, self.revision)

    @property
    def pinned_ref(self) -> str:
        """The ref pinned to the commit: resolving it again gives the same files."""
        return format_ref(self.repo, self.repo_type, self.commit)

    def as_json(self, *, with_path: bool = False) -> dict:
        """A JSON-able record for sources.json.

        The local path is left out unless asked for: it differs from machine to machine, and a
        record that depends only on what was asked and what it resolved to keeps the download
        stage's output (and DVC's hash of it) the same wherever it runs.
        """
        out = {"ref": self.ref, "repo": self.repo, "repo_type": self.repo_type, "revision": self.revision, "commit": self.commit}
        if with_path:
            out["path"] = str(self.path)
        return out


def parse_ref(ref: str) -> tuple[RepoType, str, str | None]:
    """``hf://org/name[@rev]`` -> ("model", "org/name", rev or None); ``hf://datasets/...`` -> "dataset"."""
    if not isinstance(ref, str) or not ref.startswith("hf://"):
        raise HubError(str(ref), _REF_FORM)
    body, at, revision = ref[len("hf://") :].partition("@")
    repo_type: RepoType = "model"
    if body.startswith("datasets/"):
        repo_type, body = "dataset", body[len("datasets/") :]
    if not _valid_repo(body) or (at and not _valid_revision(revision)):
        raise HubError(ref, _REF_FORM)
    return repo_type, body, (revision if at else None)


def format_ref(repo: str, repo_type: str = "model", revision: str | None = None) -> str:
    prefix = "hf://datasets/" if repo_type == "dataset" else "hf://"
    return f"{prefix}{repo}@{revision or DEFAULT_REVISION}"


def _valid_repo(repo: str) -> bool:
    parts = repo.split("/")
    return len(parts) == 2 and all(_NAME.fullmatch(p) and not p.endswith(".") and ".." not in p for p in parts)


def _valid_revision(revision: str) -> bool:
    return (
        bool(revision)
        and not any(c.isspace() for c in revision)
        and ".." not in revision.split("/")
        and not revision.startswith("/")
        and "\\" not in revision
    )


def _check(repo: str, repo_type: str, revision: str | None) -> str:
    ref = format_ref(repo, repo_type, revision)
    if repo_type not in REPO_TYPES:
        raise HubError(ref, f"repo_type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    if not _valid_repo(repo):
        raise HubError(ref, "expected a repository id org/name")
    if revision is not None and not _valid_revision(revision):
        raise HubError(ref, f"invalid revision {revision!r}")
    return ref
