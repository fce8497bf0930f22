"""merge: every method of ``merge.methods``; a static one writes a checkpoint, a dynamic one its per-task forms."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mergeflow import methods
from mergeflow.methods import MergeJob
from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import write_json
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import TaskVectors, merge_to_disk, resolve_device
from mergeflow.params import Params
from mergeflow.stages.layout import QUERIES_NAME, SWITCH_SUFFIX, Layout, Log, family_of, floating_params, noop, require, tasks_of
from mergeflow.stages.units import Map, run_stage_units


def run(p: Params, root: Path, log: Log = noop, map_units: Map | None = None) -> dict:
    """Every method in ``merge.methods``; static ones write a checkpoint, dynamic ones per-task forms."""
    return run_stage_units("merge", p, root, log, map_units)


def unit_names(p: Params, lay: Layout) -> list[str]:
    return list(p.merge.methods)


def run_unit(p: Params, lay: Layout, name: str, work: Path, log: Log) -> dict:
    tasks = tasks_of(p, lay)
    base = Checkpoint(require(lay.checkpoints / "base", "download"))
    method = methods.get(name)
    dst = work / name
    device = resolve_device(p.device)
    with tempfile.TemporaryDirectory(dir=work, prefix=".exemplars-") as tmp:
        job = MergeJob(
            tasks=tasks,
            base=base,
            hp=p.hyper(name),
            dst=dst,
            device=device,
            vector=lambda t: require(lay.vectors / f"{t}.safetensors", "extract"),
            switch=lambda t: require(lay.switches / f"{t}{SWITCH_SUFFIX}", "compress"),
            queries=lambda: _queries(lay),
            merge=lambda m, sources, hp, data=None: merge_to_disk(
                m, base, sources, hp, dst, device, metadata={"tasks": ",".join(tasks)}, data=data
            ),
            layer_inputs=lambda n: exemplar_stats(p, lay, tasks, n, base.names(), Path(tmp), log),
            log=log,
        )
        storage, info = (method.write or default_write)(method, job)
    meta = {"method": name, "dynamic": method.dynamic, "tasks": tasks, "storage_bytes": storage, **info}
    write_json(dst / "method.json", meta)
    log(f"merge: {name}: {storage:,} bytes stored")
    return meta


def default_write(method: methods.Method, job: MergeJob) -> tuple[int, dict]:
    """The engine over the extracted task vectors into a checkpoint (one per task if dynamic),
    with the exemplars' statistics for a method that needs them; storage from the method."""
    sources = [TaskVectors.from_vector(job.base, job.vector(t)) for t in job.tasks]
    data = job.layer_inputs(job.hp["exemplars"]) if method.data == "layer_inputs" else None
    job.merge(method, sources, job.hp, data=data)
    n, itemsize = floating_params(job.base)
    shapes = {k: tuple(job.base.shape(k)) for k in job.base.names() if job.base.tensor_dtype(k).is_floating_point}
    storage = method.storage_bytes(n, len(job.tasks), itemsize, hp=job.hp, shapes=shapes)
    return storage, {"store": "checkpoint" if not method.dynamic else "checkpoints", **job.hp}


def exemplar_stats(p: Params, lay: Layout, tasks: list[str], n: int, names: list[str], folder: Path, log: Log = noop) -> list:
    """Per task, the layer-input statistics of its expert on ``n`` of its train rows (the rows
    Auto-Switch's queries would take: seeded by ``seed`` and the task's position), written to
    ``folder`` one task at a time and read back lazily (``features.StatsFile``): the merge then
    holds one tensor's statistics of every task, never every task's whole set."""
    from mergeflow.autoswitch import query_rows
    from mergeflow.layer_stats import StatsFile, layer_input_stats, save_stats

    fam = family_of(lay, resolve_device(p.device), p.evaluate.batch_size)
    out = []
    for i, task in enumerate(tasks):
        data = fam.load_data(task, "train")
        if len(data) == 0:
            raise MergeflowError(f"{lay.data / task}: no train rows for the exemplars")
        rows = query_rows(len(data), n, p.seed, i)
        model = fam.build(Checkpoint(require(lay.checkpoints / task, "download")).state_dict())
        ckpt_name = _checkpoint_names(model, fam.tensors(model), set(names))
        stats = layer_input_stats(model, lambda: fam.predict(model, task, data, rows), list(ckpt_name))
        stats = {ckpt_name[k]: v for k, v in stats.items()}
        model = None  # free the expert before the next one is built
        save_stats(folder / f"{task}.safetensors", stats)
        del stats
        out.append(StatsFile(folder / f"{task}.safetensors"))
        log(f"merge: {task}: layer inputs of {len(rows)} exemplars measured on its expert")
    return out


def _checkpoint_names(model: torch.nn.Module, live: dict[str, torch.Tensor], names: set[str]) -> dict[str, str]:
    """{model parameter name: checkpoint name} of the parameters the family merges (they share
    memory with ``fam.tensors``: a LoRA factor is named otherwise in the model); a parameter
    tied to another (an LM head on the embedding) is left out: its statistics are another layer's."""
    by_ptr = {t.data_ptr(): n for n, t in live.items() if n in names and t.numel()}
    uses: dict[int, list[str]] = {}
    for pname, prm in model.named_parameters(remove_duplicate=False):
        uses.setdefault(prm.data_ptr(), []).append(pname)
    return {pnames[0]: by_ptr[ptr] for ptr, pnames in uses.items() if ptr in by_ptr and len(pnames) == 1}


def finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    return dict(results)


def _queries(lay: Layout) -> Path:
    """Auto-Switch's query set, or a one-line error saying why compress wrote none."""
    path = lay.switches / QUERIES_NAME
    if not path.exists() and (lay.switches / "stats.json").exists():
        raise MergeflowError(
            f"{path}: no Auto-Switch query set: the tasks have no train split to draw it from "
            f"(download.tasks.<task>.train_split, download.options.query_pool)"
        )
    return require(path, "compress")
