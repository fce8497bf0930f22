"""The model-family interface: what the stages need from a model family, and nothing more.

A family turns downloaded sources into the pipeline's artifacts (``prepare``, the download
stage) and evaluates task models built from the mergeable tensors (``build`` / ``predict`` /
``score``, the evaluate stage; ``features`` for Auto-Switch's routing queries). The stages in
:mod:`mergeflow.stages` stay family-agnostic: they only ever see checkpoints of *mergeable*
tensors, so extract, compress and merge work the same for every family.

What ``prepare`` writes (``checkpoints/``, ``heads/``, ``data/``) is described in
docs/family-artifacts.md. Families are registered by name in :data:`mergeflow.models.FAMILIES`
(looked up with :func:`mergeflow.models.get_family`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

Log = Callable[[str], None]
FROZEN = "_frozen"  # checkpoints/_frozen: a backbone that is never merged (LoRA adapters' base model)


@dataclass(frozen=True)
class Source:
    """One downloaded model or dataset: the ref as written in params, its local folder and the pin.

    ``commit`` is the 40-hex hub commit for ``hf://`` refs; for a local path it is ``None`` and
    ``fingerprint`` (a content hash of the files) pins it instead."""

    ref: str
    path: Path
    commit: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class TaskSources:
    """A task's fine-tuned model (or adapter) and its evaluation dataset, with the task's options
    from params (``download.tasks.<task>``, minus ``model`` and ``dataset``)."""

    name: str
    model: Source
    dataset: Source | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sources:
    """Everything the download stage resolved, handed to ``Family.prepare``."""

    family: str
    base: Source
    tasks: dict[str, TaskSources]
    options: dict[str, Any] = field(default_factory=dict)  # download.options: family-wide settings
    seed: int = 0


class Family(ABC):
    """A model family. One instance serves one evaluate (or compress) stage call.

    ``artifacts`` is the workspace's artifacts folder (``checkpoints/``, ``heads/``, ``data/``
    as ``prepare`` wrote them), ``device`` where models run, ``batch_size`` the evaluation
    batch size (params ``evaluate.batch_size``).
    """

    name: ClassVar[str]
    #: params ``download.options`` keys this family accepts, with their defaults
    options: ClassVar[dict[str, Any]] = {}
    #: params ``download.tasks.<task>`` keys (besides ``model`` and ``dataset``), with defaults
    task_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, artifacts: Path, device: torch.device | str = "cpu", batch_size: int = 256):
        self.artifacts = Path(artifacts)
        self.device = torch.device(device)
        self.batch_size = batch_size

    # --- download stage -------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def prepare(cls, sources: Sources, out: Path, log: Log) -> dict[str, Any]:
        """Write ``out/checkpoints``, ``out/heads`` and ``out/data`` from the resolved sources.

        Returns family facts for sources.json (e.g. ``{"metrics": {task: "accuracy"}}``). Bad
        input (a checkpoint that is not of this family, a missing column) is a one-line
        MergeflowError naming the file, key or tensor."""

    # --- evaluate stage -------------------------------------------------------------------

    @abstractmethod
    def build(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """An eval-mode model on ``self.device`` from the mergeable tensors (names as in
        ``checkpoints/base``). May share memory with ``state_dict`` (no copy when on device)."""

    def tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's live mergeable tensors keyed by checkpoint names (Auto-Switch edits them
        in place). Default: the model's state dict."""
        return dict(model.state_dict())

    @abstractmethod
    def load_data(self, task: str, split: str, limit: int | None = None) -> Any:
        """A task's split (``"test"`` or ``"train"``), first ``limit`` rows; supports ``len()``."""

    def has_split(self, task: str, split: str) -> bool:
        """Whether the download stage wrote ``split`` for ``task`` (a text task without a train
        split, or with ``query_pool: 0``, has no Auto-Switch query pool)."""
        from mergeflow.errors import MergeflowError

        try:
            self.load_data(task, split, limit=1)
        except MergeflowError:
            return False
        return True

    @abstractmethod
    def predict(self, model: torch.nn.Module, task: str, data: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row outputs (first dim = number of rows) of ``model`` on ``data[rows]`` (all rows when
        None) for ``task``: predicted labels, regression values, or per-row loss sums."""

    @abstractmethod
    def score(self, task: str, outputs: torch.Tensor, data: Any) -> dict[str, Any]:
        """``{"score": float, "metric": str, ...}`` from the outputs of every row of ``data``, in
        order. ``score`` is higher-is-better (accuracy, F1, Matthews, Spearman, 1/perplexity);
        extra keys (e.g. ``"perplexity"``) are reported beside it."""

    @abstractmethod
    def features(self, model: torch.nn.Module, data: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Auto-Switch's routing features [rows, d] in float32 on the CPU: normalised image
        embeddings (CLIP), the CLS state (text encoders), the mean last hidden state (LMs)."""


def read_config(folder: Path) -> tuple[Path, dict]:
    """(path, parsed JSON) of a checkpoint folder's config.json (or the file itself); a missing or
    unparsable file is a one-line MergeflowError naming it."""
    import json

    from mergeflow.errors import MergeflowError

    path = Path(folder)
    path = path if path.name == "config.json" else path / "config.json"
    if not path.exists():
        raise MergeflowError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise MergeflowError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise MergeflowError(f"{path}: expected a JSON object")
    return path, raw
