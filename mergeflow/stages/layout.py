"""The workspace a pipeline runs in: where each stage's artifacts live (the ``outs`` of dvc.yaml),
the checks made before any work, and small helpers every stage uses."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mergeflow.autoswitch import QUERIES_NAME
from mergeflow.codecs.switch import SWITCH_SUFFIX
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.io.outputs import check_apart, check_replaceable, keep_tree, read_marker
from mergeflow.params import Params

__all__ = [
    "Log",
    "STAGES",
    "SWITCH_SUFFIX",
    "QUERIES_NAME",
    "Layout",
    "require",
    "tasks_of",
    "family_of",
    "floating_params",
    "check_sources_apart",
    "preflight",
]

Log = Callable[[str], None]
STAGES = ("download", "extract", "compress", "merge", "evaluate")


@dataclass(frozen=True)
class Layout:
    """Where each stage's artifacts live (the ``outs`` of dvc.yaml)."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def checkpoints(self) -> Path:
        return self.artifacts / "checkpoints"

    @property
    def heads(self) -> Path:
        return self.artifacts / "heads"

    @property
    def data(self) -> Path:
        return self.artifacts / "data"

    @property
    def sources(self) -> Path:
        return self.artifacts / "sources.json"

    @property
    def vectors(self) -> Path:
        return self.artifacts / "vectors"

    @property
    def switches(self) -> Path:
        return self.artifacts / "switches"

    @property
    def merged(self) -> Path:
        return self.artifacts / "merged"

    @property
    def eval(self) -> Path:
        return self.artifacts / "eval"

    def claim(self, stages: tuple[str, ...] | list[str] = STAGES) -> None:
        """Refuse (one line), before any work, when an output of these stages is in the way: a
        folder or file there that mergeflow did not write (see :mod:`mergeflow.io.outputs`)."""
        for folder in (self.artifacts, self.root / ".mergeflow"):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise MergeflowError(f"{folder}: exists and is not a folder; mergeflow keeps its outputs there, move it away")
        if self.artifacts.is_dir() and read_marker(self.artifacts) is None and self._restored():
            keep_tree(self.artifacts)
        for stage in stages:
            for out in self.outs(stage):
                check_replaceable(out, is_dir=out != self.sources, kind=None if out == self.sources else f"stage:{stage}")

    def _restored(self) -> bool:
        """Whether ``artifacts/`` lacks only its tree marker: DVC restores the stage outputs of a
        clone (``dvc pull``/``checkout``), each with its own marker, but not the folder's marker.
        True when every entry is a marked mergeflow output, ``sources.json`` or DVC's ``.gitignore``."""
        for entry in self.artifacts.iterdir():
            if entry.name in (self.sources.name, ".gitignore") and entry.is_file() and not entry.is_symlink():
                continue
            if not (entry.is_dir() and not entry.is_symlink() and read_marker(entry) is not None):
                return False
        return any(self.artifacts.iterdir())

    def outs(self, stage: str) -> list[Path]:
        return {
            "download": [self.checkpoints, self.heads, self.data, self.sources],
            "extract": [self.vectors],
            "compress": [self.switches],
            "merge": [self.merged],
            "evaluate": [self.eval],
        }[stage]


def noop(msg: str) -> None:
    """A log that drops its messages."""


def require(path: Path, stage: str) -> Path:
    """``path``, or a one-line error naming the stage that makes it."""
    if not path.exists():
        raise MergeflowError(f"{path}: missing input (run the {stage} stage first)")
    return path


def tasks_of(p: Params, lay: Layout) -> list[str]:
    """The tasks this run covers: the source's tasks, or the extract.tasks subset of them."""
    sources = json.loads(require(lay.sources, "download").read_text())
    tasks = list(sources["tasks"])
    if p.extract.tasks is None:
        return tasks
    for t in p.extract.tasks:
        if t not in tasks:
            raise MergeflowError(f"params: extract.tasks: {t!r} is not a task of {sources['source']} (tasks: {', '.join(tasks)})")
    return list(p.extract.tasks)


def family_of(lay: Layout, device, batch_size: int = 256):
    """The model family that wrote the artifacts (sources.json), ready to evaluate."""
    from mergeflow.models import get_family

    sources = json.loads(require(lay.sources, "download").read_text())
    return get_family(sources.get("family", "zoo"))(lay.artifacts, device, batch_size)


def floating_params(ckpt: Checkpoint) -> tuple[int, int]:
    """(floating parameters of one model, bytes per parameter in the base's dtype)."""
    n = sum(math.prod(ckpt.shape(name)) for name in ckpt.names() if ckpt.tensor_dtype(name).is_floating_point)
    return n, ckpt.dtype().itemsize


def check_sources_apart(lay: Layout, ref: str, path: Path, where: str) -> None:
    """A local source may not be, hold or lie inside the workspace's outputs or its state."""
    for out in (*lay.outs("download"), lay.root / ".mergeflow"):
        try:
            check_apart(out, [path])
        except MergeflowError as exc:
            raise MergeflowError(f"params: {where}: {ref}: {exc}") from None


def local_path(ref: str, root: Path | None) -> Path:
    """A local source as params give it: ``~`` expanded, a relative path taken from the workspace
    (the params file's folder), not from wherever the command was started."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() or root is None else Path(root) / path


def preflight(p: Params, root: Path, names: tuple[str, ...] | list[str] = STAGES) -> None:
    """Everything about the workspace that can be checked before any work: no output of these
    stages is in the way (:meth:`Layout.claim`), and no local source overlaps an output."""
    lay = Layout(Path(root))
    lay.claim(names)
    d = p.download
    if "download" in names and d.family is not None:
        refs = [("download.base", d.base)] + [
            (f"download.tasks.{t}.{k}", spec.get(k)) for t, spec in d.tasks.items() for k in ("model", "dataset")
        ]
        for where, ref in refs:
            if isinstance(ref, str) and not ref.startswith("hf://") and local_path(ref, lay.root).exists():
                check_sources_apart(lay, ref, local_path(ref, lay.root), where)
