"""Checkpoint references: local directories or files, and ``hf://org/name[@revision]``."""
from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError


def resolve_ref(ref: str) -> Path:
    """A local path for ``ref``; hub refs go through huggingface_hub (its cache, HF_HUB_OFFLINE honoured)."""
    if ref.startswith("hf://"):
        repo, _, revision = ref[len("hf://"):].partition("@")
        if repo.count("/") != 1:
            raise MergeflowError(f"{ref}: expected hf://org/name[@revision]")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo, revision=revision or None, allow_patterns=["*.json", "*.safetensors"]))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            raise MergeflowError(f"{ref}: cannot resolve {repo}@{revision or 'main'} ({' '.join(str(exc).split())[:200]})") from None
    path = Path(ref)
    if not path.exists():
        raise MergeflowError(f"checkpoint not found: {ref}")
    return path
