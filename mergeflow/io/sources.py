"""Checkpoint references: local directories or files, and ``hf://org/name[@revision]``."""
from __future__ import annotations

import os
from pathlib import Path

from mergeflow.errors import MergeflowError

SAFETENSORS_PATTERNS = ["*.json", "*.safetensors"]
TORCH_PATTERNS = ["*.json", "*.bin", "*.pt", "*.pth"]  # only when a repo has no safetensors


def resolve_ref(ref: str) -> Path:
    """A local path for ``ref``; hub refs go through huggingface_hub's cache.

    ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE`` are read when called (huggingface_hub
    reads them once, at import). Safetensors weights are preferred; ``.bin``/``.pt`` files are
    fetched only for a repo that has no ``*.safetensors``.
    """
    if ref.startswith("hf://"):
        repo, at, revision = ref[len("hf://"):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision):
            raise MergeflowError(f"{ref}: expected hf://org/name[@revision]")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        kwargs = dict(revision=revision or None, cache_dir=_hub_cache(), local_files_only=_hub_offline())
        try:
            path = Path(snapshot_download(repo, allow_patterns=SAFETENSORS_PATTERNS, **kwargs))
            if not any(path.glob("*.safetensors")):
                path = Path(snapshot_download(repo, allow_patterns=TORCH_PATTERNS, **kwargs))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            raise MergeflowError(f"{ref}: cannot resolve {repo}@{revision or 'main'} ({' '.join(str(exc).split())[:200]})") from None
        return path
    path = Path(ref)
    if not path.exists():
        raise MergeflowError(f"checkpoint not found: {ref}")
    return path


def _hub_cache() -> str | None:
    """The hub cache directory from the environment now (None: huggingface_hub's default)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return os.path.join(home, "hub")
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
