"""merge: every method of ``merge.methods``; a static one writes a checkpoint, a dynamic one its per-task forms."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import write_json
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import TaskVectors, merge_to_disk, resolve_device
from mergeflow.params import Params
from mergeflow.stages.layout import (QUERIES_NAME, SWITCH_SUFFIX, Layout, Log, family_of, floating_params, noop, require,
                                     tasks_of)
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
    if name in ("tswitch", "autoswitch"):
        # T-Switch's compact form is the switches themselves: the task model is built on load;
        # Auto-Switch keeps its query set beside them.
        dst.mkdir()
        files = [f"{task}{SWITCH_SUFFIX}" for task in tasks] + ([QUERIES_NAME] if name == "autoswitch" else [])
        for f in files:
            shutil.copyfile(require(lay.switches / f, "compress"), dst / f)
        storage = sum((dst / f).stat().st_size for f in files)
        info = {"store": "switches", "drop": p.compress.drop}
        if name == "autoswitch":
            info |= {k: v for k, v in p.merge.hyper(name).items() if k != "drop"} | {"queries": p.compress.queries}
    elif name in ("tvq", "rtvq"):
        hp = p.merge.hyper(name)
        storage, info = _quantised_merge(p, lay, name, hp, tasks, base, dst)
    else:
        hp = p.merge.hyper(name)
        sources = [TaskVectors.from_vector(base, require(lay.vectors / f"{t}.safetensors", "extract")) for t in tasks]
        with tempfile.TemporaryDirectory(dir=work, prefix=".exemplars-") as tmp:
            data = exemplar_stats(p, lay, tasks, hp["exemplars"], base.names(), Path(tmp), log) \
                if method.needs == "layer_inputs" else None
            merge_to_disk(method, base, sources, hp, dst, resolve_device(p.device), metadata={"tasks": ",".join(tasks)},
                          data=data)
        n, itemsize = floating_params(base)
        shapes = {k: tuple(base.shape(k)) for k in base.names() if base.tensor_dtype(k).is_floating_point}
        storage = method.storage_bytes(n, len(tasks), itemsize, hp=hp, shapes=shapes)
        info = {"store": "checkpoint" if not method.dynamic else "checkpoints", **hp}
    meta = {"method": name, "dynamic": method.dynamic, "tasks": tasks, "storage_bytes": storage, **info}
    write_json(dst / "method.json", meta)
    log(f"merge: {name}: {storage:,} bytes stored")
    return meta


def _quantised_merge(p: Params, lay: Layout, name: str, hp: dict, tasks: list[str], base: Checkpoint,
                     dst: Path) -> tuple[int, dict]:
    """TVQ / RTVQ as codecs: the task vectors are quantised into files (``dst/codes``: one
    ``<task>.tvq`` per task, or one ``tasks.rtvq``), and the wrapped merge reads its task vectors
    back from those files one tensor at a time. Storage is the files' payload."""
    from mergeflow.codecs.quant import QuantReader, save_rtvq_from, save_tvq_from
    from mergeflow.methods.tvq import inner

    vectors = [Checkpoint(require(lay.vectors / f"{t}.safetensors", "extract")) for t in tasks]
    codes = Path(tempfile.mkdtemp(prefix=f".{name}-codes.", suffix=".tmp", dir=dst.parent))
    try:
        if name == "tvq":
            stats = save_tvq_from(vectors, hp["bits"], codes, tasks)
            views = [QuantReader(codes / f"{t}.tvq").task() for t in tasks]
        else:
            stats = [save_rtvq_from(vectors, hp["base_bits"], hp["offset_bits"], codes / "tasks.rtvq",
                                    {"tasks": ",".join(tasks)})]
            reader = QuantReader(codes / "tasks.rtvq")
            views = [reader.task(i) for i in range(len(tasks))]
        method, options = inner(hp)
        merge_to_disk(method, base, [TaskVectors(base, v, True) for v in views], options, dst, resolve_device(p.device),
                      metadata={"tasks": ",".join(tasks)})
        os.replace(codes, dst / "codes")
    finally:
        shutil.rmtree(codes, ignore_errors=True)
    storage = sum(st.payload_bytes for st in stats)
    return storage, {"store": "checkpoint", "codes": sorted(f.name for f in (dst / "codes").iterdir()),
                     "codes_file_bytes": sum(st.file_bytes for st in stats), **hp}


def exemplar_stats(p: Params, lay: Layout, tasks: list[str], n: int, names: list[str], folder: Path,
                   log: Log = noop) -> list:
    """Per task, the layer-input statistics of its expert on ``n`` of its train rows (the rows
    Auto-Switch's queries would take: seeded by ``seed`` and the task's position), written to
    ``folder`` one task at a time and read back lazily (``features.StatsFile``): the merge then
    holds one tensor's statistics of every task, never every task's whole set."""
    from mergeflow.autoswitch import query_rows
    from mergeflow.features import StatsFile, layer_input_stats, save_stats

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
        del model
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
