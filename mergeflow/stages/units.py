"""A stage as independent units (one per task, method or evaluated model) that read their inputs
from the workspace and write into the stage's work folder, so a task runner (threads, Dask) can
run them at once, in other processes too; ``finish`` assembles what the units returned and the
work folder replaces the stage's output whole (atomically).

Each stage module (``mergeflow.stages.<stage>``) defines ``run``, and, when it has units,
``unit_names(p, lay)``, ``run_unit(p, lay, unit, work, log)`` and ``finish(p, lay, work, results,
log)``. Stage modules are imported by name here, so a stage's code is only its own module and
what it imports (``mergeflow.stages.spec`` computes that set).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir
from mergeflow.params import Params
from mergeflow.stages.layout import STAGES, Layout, Log, noop

Map = Callable[[Callable[[str], dict], list[str]], list[dict]]
WITH_UNITS = ("extract", "compress", "merge", "evaluate")


def module(stage: str):
    """The module of one stage."""
    if stage not in STAGES:
        raise MergeflowError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(f"mergeflow.stages.{stage}")


def run(stage: str, p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """The whole stage ``stage`` in the workspace ``root``; its summary."""
    return module(stage).run(p, Path(root), log, map_units)


def _sequential(fn: Callable[[str], dict], items: list[str]) -> list[dict]:
    return [fn(x) for x in items]


def units(stage: str, p: Params, root: Path) -> list[str]:
    """The independent units of ``stage``: tasks (extract, compress + the query set), methods
    (merge), evaluated models (evaluate: experts, base, each method)."""
    if stage not in WITH_UNITS:
        raise MergeflowError(f"stage {stage!r} has no units (stages with units: {', '.join(WITH_UNITS)})")
    return module(stage).unit_names(p, Layout(Path(root)))


def run_unit(stage: str, p: Params, root: Path, unit: str, work: Path, log: Log = noop) -> dict:
    """One unit of ``stage``, writing into ``work`` (the stage's output being built); JSON-able result."""
    return module(stage).run_unit(p, Layout(Path(root)), unit, Path(work), log)


def finish(stage: str, p: Params, root: Path, work: Path, results: dict[str, dict], log: Log = noop) -> dict:
    """Assemble the units' results into the stage's summary (and its files in ``work``)."""
    return module(stage).finish(p, Layout(Path(root)), Path(work), results, log)


def run_stage_units(stage: str, p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """The whole stage: its units through ``map_units`` (default: one after another), then ``finish``."""
    lay = Layout(root)
    names = units(stage, p, root)
    with atomic_dir(lay.outs(stage)[0], kind=f"stage:{stage}") as work:
        results = (map_units or _sequential)(lambda u: run_unit(stage, p, root, u, work, log), names)
        return finish(stage, p, root, work, dict(zip(names, results)), log)
