"""Checkpoint references: local directories or files, and ``hf://org/name[@revision]``."""

from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.io import hub


def resolve_ref(ref: str) -> Path:
    """A local path for ``ref``; hub refs go through huggingface_hub's cache (see :mod:`mergeflow.io.hub`).

    ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE`` are read when called. Safetensors weights
    are preferred; ``.bin``/``.pt`` files are fetched only for a repo that has no ``*.safetensors``.
    Use :func:`mergeflow.io.hub.resolve` for the commit a hub ref resolved to.
    """
    if ref.startswith("hf://"):
        try:
            repo_type, repo, revision = hub.parse_ref(ref)
        except MergeflowError:
            raise MergeflowError(f"{ref}: expected hf://org/name[@revision]") from None
        if repo_type != "model":
            raise MergeflowError(f"{ref}: a dataset, not a checkpoint; expected hf://org/name[@revision]")
        try:
            return hub.resolve(repo, "model", revision).path
        except hub.HubError as exc:
            raise MergeflowError(f"{ref}: cannot resolve {repo}@{revision or 'main'} ({exc.reason})") from None
    path = Path(ref)
    if not path.exists():
        raise MergeflowError(f"checkpoint not found: {ref}")
    return path
