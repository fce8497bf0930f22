"""evaluate: the task metric of the base, every expert and every method on each task's test split;
metrics.json, per_task.csv and the plots."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch

from mergeflow import methods
from mergeflow.autoswitch import evaluate_autoswitch
from mergeflow.codecs.switch import load_switch
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import resolve_device
from mergeflow.methods import tswitch
from mergeflow.params import Params
from mergeflow.stages.layout import SWITCH_SUFFIX, Layout, Log, family_of, floating_params, noop, require, tasks_of
from mergeflow.stages.units import Map, run_stage_units

def task_state_dicts(lay: Layout, name: str, tasks: list[str], base_sd: dict[str, torch.Tensor]):
    """Yield (task, state dict) of a merged method: the same model for a static method."""
    meta = json.loads(require(lay.merged / name / "method.json", "merge").read_text())
    if meta.get("store") == "switches":
        for task in tasks:
            path = lay.merged / name / f"{task}{SWITCH_SUFFIX}"
            yield task, tswitch.apply_switch(base_sd, load_switch(path), source=str(path))
    elif meta["dynamic"]:
        for i, task in enumerate(tasks):
            yield task, Checkpoint(lay.merged / name / f"task_{i}").state_dict()
    else:
        sd = Checkpoint(lay.merged / name).state_dict()
        for task in tasks:
            yield task, sd


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
    key = (str(lay.artifacts.resolve()), str(resolve_device(p.device)), p.evaluate.batch_size, p.evaluate.limit,
           tuple(tasks), hashlib.sha256(lay.sources.read_bytes()).hexdigest())
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
    meta = json.loads(require(lay.merged / unit / "method.json", "merge").read_text())
    if unit == "autoswitch":
        modes = evaluate_autoswitch(lay.merged / unit, tasks, meta, fam, base_sd, data, p.seed)
        return {"storage": meta["storage_bytes"], "modes": {m: {"scores": r, "routing": a} for m, (r, a) in modes.items()}}
    return {"storage": meta["storage_bytes"], "scores": {t: score(sd, t) for t, sd in task_state_dicts(lay, unit, tasks, base_sd)}}


def finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    from mergeflow import evaluate as ev

    tasks = tasks_of(p, lay)
    n, _ = floating_params(Checkpoint(require(lay.checkpoints / "base", "download")))
    tv_bytes = 4 * n * len(tasks)
    expert_acc = {t: r["score"] for t, r in results["experts"]["scores"].items()}

    def row(scores: dict[str, dict], storage: int, **extra) -> dict:
        more = {}
        for key in sorted({k for r in scores.values() for k in r} - {"score", "metric"}):
            more[key] = {t: r[key] for t, r in scores.items() if key in r}
        return ev.entry({t: r["score"] for t, r in scores.items()}, expert_acc, storage, tv_bytes, **more, **extra)

    log("evaluate: experts " + ", ".join(f"{t} {a:.3f}" for t, a in expert_acc.items()))
    metrics = {"methods": {}, "experts": row(results["experts"]["scores"], tv_bytes), "base": row(results["base"]["scores"], 0)}
    for name in p.merge.methods:
        res = results[name]
        if name == "autoswitch":
            for mode, r in res["modes"].items():
                metrics["methods"][f"autoswitch_{mode}"] = row(r["scores"], res["storage"], routing_acc=r["routing"],
                                                              method=name, mode=mode, dynamic=True)
                m = metrics["methods"][f"autoswitch_{mode}"]
                log(f"evaluate: autoswitch ({mode}): score {m['acc_avg']:.4f}, normalised {m['norm_acc_avg']:.4f}, "
                    f"routing {r['routing']:.4f}")
            continue
        metrics["methods"][name] = row(res["scores"], res["storage"], dynamic=methods.get(name).dynamic)
        log(f"evaluate: {name}: score {metrics['methods'][name]['acc_avg']:.4f}, "
            f"normalised {metrics['methods'][name]['norm_acc_avg']:.4f}")
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
