"""evaluate: the task metric of the base, every expert and every method on each task's test split;
metrics.json, per_task.csv and the plots."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterator

import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import resolve_device
from mergeflow.methods import EvalJob
from mergeflow.params import Params
from mergeflow.stages.layout import Layout, Log, family_of, floating_params, noop, require, tasks_of
from mergeflow.stages.units import Map, run_stage_units


def stored_models(job: EvalJob) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(task, state dict) of a merged method as the engine wrote it: one model for a static
    method (the same for every task), ``task_<i>`` per task for a dynamic one."""
    if job.meta["dynamic"]:
        for i, task in enumerate(job.tasks):
            yield task, Checkpoint(job.folder / f"task_{i}").state_dict()
    else:
        sd = Checkpoint(job.folder).state_dict()
        for task in job.tasks:
            yield task, sd


def scored_rows(method: methods.Method, job: EvalJob) -> dict[str, dict]:
    """One metrics row per model the method gives: its models' scores on each task."""
    return {method.name: {"scores": {t: job.score(sd, t) for t, sd in job.models()}, "extra": {"dynamic": method.dynamic}}}


def run(p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """The task metric of the base, every expert and every method on each task's test split
    (accuracy, a GLUE metric or 1/perplexity: the family's ``score``); metrics.json, per_task.csv, plots."""
    return run_stage_units("evaluate", p, root, log, map_units)


def unit_names(p: Params, lay: Layout) -> list[str]:
    return ["experts", "base", *p.merge.methods]


_EVAL_LOCK = threading.Lock()
_EVAL_INPUTS: dict = {}


def _eval_inputs(p: Params, lay: Layout):
    """(family, test data per task, base state dict), loaded once per process and shared by the
    evaluate units that run in it (threads): images are decoded and resized once, not per model."""
    tasks = tasks_of(p, lay)
    base_file = require(lay.checkpoints / "base", "download")
    key = (
        str(lay.artifacts.resolve()),
        str(resolve_device(p.device)),
        p.evaluate.batch_size,
        p.evaluate.limit,
        tuple(tasks),
        hashlib.sha256(lay.sources.read_bytes()).hexdigest(),
    )
    with _EVAL_LOCK:
        if key not in _EVAL_INPUTS:
            _EVAL_INPUTS.clear()  # one workspace's inputs at a time
            fam = family_of(lay, resolve_device(p.device), p.evaluate.batch_size)
            data = {}
            for task in tasks:
                data[task] = fam.load_data(task, "test", p.evaluate.limit)
                if len(data[task]) == 0:
                    raise MergeflowError(f"{lay.data / task}: empty test split")
                if hasattr(data[task], "pixel_values"):
                    data[task].pixel_values()  # decode once, here, under the lock
            _EVAL_INPUTS[key] = (fam, data, Checkpoint(base_file).state_dict())
        return _EVAL_INPUTS[key]


def run_unit(p: Params, lay: Layout, unit: str, work: Path, log: Log) -> dict:
    """Scores of one evaluated model (``experts``, ``base`` or a method) on every task."""
    tasks = tasks_of(p, lay)
    fam, data, base_sd = _eval_inputs(p, lay)
    built: list = [None, None]  # (state dict, model): a static merge's one model serves every task

    def score(sd: dict[str, torch.Tensor], task: str) -> dict:
        if built[0] is not sd:
            built[:] = [None, None]
            built[:] = [sd, fam.build(sd)]
        return fam.score(task, fam.predict(built[1], task, data[task]), data[task])

    if unit == "experts":
        return {"scores": {t: score(Checkpoint(lay.checkpoints / t).state_dict(), t) for t in tasks}}
    if unit == "base":
        return {"scores": {t: score(base_sd, t) for t in tasks}}
    method = methods.get(unit)
    folder = require(lay.merged / unit, "merge")
    meta = json.loads(require(folder / "method.json", "merge").read_text())
    job = EvalJob(
        tasks=tasks,
        folder=folder,
        meta=meta,
        base=base_sd,
        family=fam,
        data=data,
        seed=p.seed,
        score=score,
        models=lambda: (method.models or stored_models)(job),
    )
    rows = method.evaluate(job) if method.evaluate is not None else scored_rows(method, job)
    return {"storage": meta["storage_bytes"], "rows": rows}


def finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    from mergeflow import metrics as ev

    tasks = tasks_of(p, lay)
    n, _ = floating_params(Checkpoint(require(lay.checkpoints / "base", "download")))
    tv_bytes = 4 * n * len(tasks)
    expert_score = {t: r["score"] for t, r in results["experts"]["scores"].items()}

    def row(scores: dict[str, dict], storage: int, **extra) -> dict:
        more = {}
        for key in sorted({k for r in scores.values() for k in r} - {"score", "metric"}):
            more[key] = {t: r[key] for t, r in scores.items() if key in r}
        return ev.entry({t: r["score"] for t, r in scores.items()}, expert_score, storage, tv_bytes, **more, **extra)

    log("evaluate: experts " + ", ".join(f"{t} {a:.3f}" for t, a in expert_score.items()))
    metrics = {"methods": {}, "experts": row(results["experts"]["scores"], tv_bytes), "base": row(results["base"]["scores"], 0)}
    for name in p.merge.methods:
        res = results[name]
        for row_name, r in res["rows"].items():
            m = metrics["methods"][row_name] = row(r["scores"], res["storage"], **r["extra"])
            routing = f", routing {m['routing_acc']:.4f}" if "routing_acc" in m else ""
            log(f"evaluate: {row_name}: score {m['acc_avg']:.4f}, normalised {m['norm_acc_avg']:.4f}{routing}")
    metrics["task_metrics"] = {t: r["metric"] for t, r in results["experts"]["scores"].items()}
    if (lay.switches / "stats.json").exists():
        stats = json.loads((lay.switches / "stats.json").read_text())
        per_task = [stats["tasks"][t] for t in tasks]
        metrics["switches"] = {
            "drop": stats["drop"],
            "bits_per_param": sum(s["bits_per_param"] for s in per_task) / len(per_task),
            "entropy_floor_bits": sum(s["entropy_floor_bits"] for s in per_task) / len(per_task),
            "keep_fraction": sum(s["keep_fraction"] for s in per_task) / len(per_task),
        }
    with _EVAL_LOCK:
        _EVAL_INPUTS.clear()  # the stage is done: free its data (and never serve it to a later run)
    ev.write_metrics(metrics, work)
    (work / "plots").mkdir()  # a dvc.yaml output either way (empty with evaluate.plots: false)
    if p.evaluate.plots:
        from mergeflow.plots import plot_all

        plot_all(metrics, work / "plots")
    return metrics
