"""The pipeline's stages as plain library functions: download -> extract -> compress -> merge -> evaluate.

Each reads its inputs from the workspace's ``artifacts/`` tree, writes its outputs atomically
and returns a small JSON-able summary. Prefect tasks (``tasks/``) and ``dvc.yaml`` both call
these; nothing here knows about either.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mergeflow import methods
from mergeflow.codecs.switch import load_switch, save_switch
from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir, write_json
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import TaskVectors, merge_to_disk, resolve_device
from mergeflow.methods import tswitch
from mergeflow.params import Params
from mergeflow.vectors import extract_task_vector

Log = Callable[[str], None]
STAGES = ("download", "extract", "compress", "merge", "evaluate")
SWITCH_SUFFIX = ".switch.safetensors"
QUERIES_NAME = "queries.safetensors"  # Auto-Switch's query set, beside the switches


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

    def outs(self, stage: str) -> list[Path]:
        return {
            "download": [self.checkpoints, self.heads, self.data, self.sources],
            "extract": [self.vectors],
            "compress": [self.switches],
            "merge": [self.merged],
            "evaluate": [self.eval],
        }[stage]


def _noop(msg: str) -> None:
    pass


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise MergeflowError(f"{path}: missing input (run the {stage} stage first)")
    return path


def tasks_of(p: Params, lay: Layout) -> list[str]:
    """The tasks this run covers: the source's tasks, or the extract.tasks subset of them."""
    sources = json.loads(_require(lay.sources, "download").read_text())
    tasks = list(sources["tasks"])
    if p.extract.tasks is None:
        return tasks
    for t in p.extract.tasks:
        if t not in tasks:
            raise MergeflowError(f"params: extract.tasks: {t!r} is not a task of {sources['source']} (tasks: {', '.join(tasks)})")
    return list(p.extract.tasks)


# --- download ---------------------------------------------------------------------------

def download(p: Params, root: Path, log: Log = _noop) -> dict:
    """Resolve the sources into ``artifacts/``; for ``zoo://`` build the zoo from the seed."""
    from mergeflow.zoo import ZooSpec, build_zoo

    lay = Layout(root)
    lay.artifacts.mkdir(parents=True, exist_ok=True)
    spec = ZooSpec(**p.download.zoo)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=lay.artifacts))
    try:
        manifest = build_zoo(tmp, seed=p.seed, spec=spec, progress=log)
        for out in (lay.checkpoints, lay.heads, lay.data):
            with atomic_dir(out) as dst:
                shutil.copytree(tmp / out.name, dst, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(lay.sources, {**manifest, "source": p.download.source})
    return {"tasks": manifest["tasks"]}


# --- extract ----------------------------------------------------------------------------

def extract(p: Params, root: Path, log: Log = _noop) -> dict:
    """Task vectors tau_t = theta_t - theta_0 for every task, as float32 safetensors."""
    lay = Layout(root)
    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    counts = {}
    with atomic_dir(lay.vectors) as out:
        for task in tasks_of(p, lay):
            counts[task] = extract_task_vector(base, Checkpoint(lay.checkpoints / task), out / f"{task}.safetensors", {"task": task})
            log(f"extract: {task}: {counts[task]:,} parameters")
    return {"n_params": counts}


# --- compress ---------------------------------------------------------------------------

def compress(p: Params, root: Path, log: Log = _noop) -> dict:
    """T-Switch every task vector and store it in the binary switch format; Auto-Switch's query set beside."""
    lay = Layout(root)
    stats = {}
    with atomic_dir(lay.switches) as out:
        for task in tasks_of(p, lay):
            vec = Checkpoint(_require(lay.vectors / f"{task}.safetensors", "extract"))
            switch = tswitch.compress(vec.items(), p.compress.drop, metadata={"task": task})
            st = save_switch(out / f"{task}{SWITCH_SUFFIX}", switch, encoding=p.compress.encoding)
            n = sum(t.numel() for _, t in vec.items())
            stats[task] = {
                "bits_per_param": st.bits_per_param,
                "entropy_floor_bits": st.entropy_floor_bits,
                "keep_fraction": st.n_kept / max(st.n_params, 1),
                "file_bytes": st.file_bytes,
                "float32_bytes": 4 * n,
                "ratio_to_float32": st.file_bytes / (4 * n),
            }
            log(f"compress: {task}: {st.bits_per_param:.3f} bits/param (floor {st.entropy_floor_bits:.3f}), "
                f"{st.file_bytes:,} bytes = {stats[task]['ratio_to_float32']:.4f} of float32")
        write_json(out / "stats.json", {"drop": p.compress.drop, "encoding": p.compress.encoding, "tasks": stats})
        queries = build_queries(p, lay)
        queries.save(out / QUERIES_NAME)
        log(f"compress: Auto-Switch query set: {p.compress.queries} per task, {queries.nbytes:,} bytes")
    return stats


def build_queries(p: Params, lay: "Layout"):
    """Auto-Switch's query set: ``compress.queries`` train samples per task, embedded by the base."""
    from mergeflow.autoswitch import sample_queries
    from mergeflow.models import vision

    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    model = vision.build_model(vision.load_config(lay.checkpoints / "base"), base.state_dict(), device=resolve_device(p.device))
    train = {}
    for task in tasks_of(p, lay):
        x, _ = vision.load_split(_require(lay.data / task, "download"), "train")
        train[task] = vision.image_embeddings(model, x).cpu()
    return sample_queries(train, p.compress.queries, seed=p.seed)


# --- merge ------------------------------------------------------------------------------

def merge(p: Params, root: Path, log: Log = _noop) -> dict:
    """Every method in ``merge.methods``; static ones write a checkpoint, dynamic ones per-task forms."""
    lay = Layout(root)
    tasks = tasks_of(p, lay)
    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    device = resolve_device(p.device)
    summary = {}
    with atomic_dir(lay.merged) as out:
        for name in p.merge.methods:
            method = methods.get(name)
            dst = out / name
            dst.mkdir()
            if name in ("tswitch", "autoswitch"):
                # T-Switch's compact form is the switches themselves: the task model is built on load;
                # Auto-Switch keeps its query set beside them.
                files = [f"{task}{SWITCH_SUFFIX}" for task in tasks] + ([QUERIES_NAME] if name == "autoswitch" else [])
                for f in files:
                    shutil.copyfile(_require(lay.switches / f, "compress"), dst / f)
                storage = sum((dst / f).stat().st_size for f in files)
                info = {"store": "switches", "drop": p.compress.drop}
                if name == "autoswitch":
                    info |= {k: v for k, v in p.merge.hyper(name).items() if k != "drop"} | {"queries": p.compress.queries}
            else:
                hp = p.merge.hyper(name)
                sources = [TaskVectors.from_vector(base, _require(lay.vectors / f"{t}.safetensors", "extract")) for t in tasks]
                dst.rmdir()
                merge_to_disk(method, base, sources, hp, dst, device, metadata={"tasks": ",".join(tasks)})
                n, itemsize = _floating_params(base)
                storage = method.storage_bytes(n, len(tasks), itemsize)
                info = {"store": "checkpoint" if not method.dynamic else "checkpoints", **hp}
            meta = {"method": name, "dynamic": method.dynamic, "tasks": tasks, "storage_bytes": storage, **info}
            write_json(dst / "method.json", meta)
            summary[name] = meta
            log(f"merge: {name}: {storage:,} bytes stored")
    return summary


def _floating_params(ckpt: Checkpoint) -> tuple[int, int]:
    """(floating parameters of one model, bytes per parameter in the base's dtype)."""
    n = sum(math.prod(ckpt.shape(name)) for name in ckpt.names() if ckpt.tensor_dtype(name).is_floating_point)
    return n, ckpt.dtype().itemsize


# --- evaluate ---------------------------------------------------------------------------

def task_state_dicts(lay: Layout, name: str, tasks: list[str], base_sd: dict[str, torch.Tensor]):
    """Yield (task, state dict) of a merged method: the same model for a static method."""
    meta = json.loads(_require(lay.merged / name / "method.json", "merge").read_text())
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


def evaluate(p: Params, root: Path, log: Log = _noop) -> dict:
    """Accuracy per task of the base, every expert and every method; metrics.json, per_task.csv, plots."""
    from mergeflow import evaluate as ev
    from mergeflow.models import vision

    lay = Layout(root)
    tasks = tasks_of(p, lay)
    device = resolve_device(p.device)
    base_ckpt = Checkpoint(_require(lay.checkpoints / "base", "download"))
    config = vision.load_config(lay.checkpoints / "base")
    base_sd = base_ckpt.state_dict()
    data, heads = {}, {}
    for task in tasks:
        x, y = vision.load_split(_require(lay.data / task, "download"), "test")
        if p.evaluate.limit:
            x, y = x[: p.evaluate.limit], y[: p.evaluate.limit]
        data[task] = (x, y)
        heads[task] = vision.load_head(_require(lay.heads / f"{task}.safetensors", "download"))

    built: list = [None, None]  # (state dict, model): a static merge's one model serves every task

    def score(sd: dict[str, torch.Tensor], task: str) -> float:
        if built[0] is not sd:
            built[:] = [sd, vision.build_model(config, sd, device=device)]
        model = built[1]
        head, scale = heads[task]
        x, y = data[task]
        return vision.accuracy(model, head.to(device), scale, x.to(device), y.to(device), batch_size=p.evaluate.batch_size)

    n_params = sum(v.numel() for v in base_sd.values() if v.is_floating_point())
    tv_bytes = 4 * n_params * len(tasks)
    expert_acc = {t: score(Checkpoint(lay.checkpoints / t).state_dict(), t) for t in tasks}
    base_acc = {t: score(base_sd, t) for t in tasks}
    log("evaluate: experts " + ", ".join(f"{t} {a:.3f}" for t, a in expert_acc.items()))
    metrics = {
        "methods": {},
        "experts": ev.entry(expert_acc, expert_acc, tv_bytes, tv_bytes),
        "base": ev.entry(base_acc, expert_acc, 0, tv_bytes),
    }
    for name in p.merge.methods:
        meta = json.loads(_require(lay.merged / name / "method.json", "merge").read_text())
        if name == "autoswitch":
            for mode, (acc, routing) in evaluate_autoswitch(lay, tasks, meta, config, base_sd, data, heads, device,
                                                            p.seed, p.evaluate.batch_size).items():
                row = ev.entry(acc, expert_acc, meta["storage_bytes"], tv_bytes, routing_acc=routing, method=name, mode=mode)
                metrics["methods"][f"autoswitch_{mode}"] = row
                log(f"evaluate: autoswitch ({mode}): acc {row['acc_avg']:.4f}, normalised {row['norm_acc_avg']:.4f}, "
                    f"routing {routing:.4f}")
            continue
        acc = {task: score(sd, task) for task, sd in task_state_dicts(lay, name, tasks, base_sd)}
        metrics["methods"][name] = ev.entry(acc, expert_acc, meta["storage_bytes"], tv_bytes)
        log(f"evaluate: {name}: acc {metrics['methods'][name]['acc_avg']:.4f}, normalised {metrics['methods'][name]['norm_acc_avg']:.4f}")
    if (lay.switches / "stats.json").exists():
        stats = json.loads((lay.switches / "stats.json").read_text())
        per_task = [stats["tasks"][t] for t in tasks]
        metrics["switches"] = {
            "drop": stats["drop"],
            "bits_per_param": sum(s["bits_per_param"] for s in per_task) / len(per_task),
            "entropy_floor_bits": sum(s["entropy_floor_bits"] for s in per_task) / len(per_task),
            "keep_fraction": sum(s["keep_fraction"] for s in per_task) / len(per_task),
        }
    with atomic_dir(lay.eval) as out:
        ev.write_metrics(metrics, out)
        if p.evaluate.plots:
            from mergeflow.plots import plot_all

            plot_all(metrics, out / "plots")
    return metrics


def evaluate_autoswitch(lay: Layout, tasks: list[str], meta: dict, config, base_sd: dict[str, torch.Tensor],
                        data: dict, heads: dict, device: torch.device, seed: int, embed_batch: int) -> dict:
    """Auto-Switch on shuffled mixed-task test batches, in every routing mode.

    Each input is routed by its base-model embedding; in each batch every distinct switch
    combination is applied once, in place, to one model (``mergeflow.runtime``), and each
    input is classified by its own task's head. Returns {mode: (acc per task, routing acc)}.
    """
    from mergeflow.autoswitch import MODES, QuerySet, combine, group_rows, route, routing_accuracy
    from mergeflow.models import vision
    from mergeflow.runtime import SwitchRuntime

    folder = lay.merged / "autoswitch"
    queries = QuerySet.load(folder / QUERIES_NAME)
    if queries.tasks != tasks:
        raise MergeflowError(f"{folder / QUERIES_NAME}: query set tasks {queries.tasks} differ from {tasks}")
    switches = {t: load_switch(folder / f"{t}{SWITCH_SUFFIX}") for t in tasks}
    model = vision.build_model(config, {k: v.clone() for k, v in base_sd.items()}, device=device)
    runtime = SwitchRuntime(dict(model.state_dict()), switches, workers=1)  # small models: no thread hand-offs
    xs = torch.cat([data[t][0] for t in tasks])
    ys = torch.cat([data[t][1] for t in tasks])
    task_of = torch.cat([torch.full((len(data[t][1]),), i) for i, t in enumerate(tasks)])
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))
    routed = route(queries, vision.image_embeddings(model, xs, embed_batch).cpu(), meta["k"])
    results = {}
    for mode in MODES:
        correct = torch.zeros(len(ys), dtype=torch.bool)
        weights_all = torch.empty_like(routed)
        try:
            for start in range(0, len(order), meta["batch_size"]):
                rows = order[start:start + meta["batch_size"]]
                weights = combine(routed[rows], mode)
                weights_all[rows] = weights
                for w, idx in group_rows(weights):
                    sel = rows[idx]
                    runtime.switch({t: float(w[i]) for i, t in enumerate(tasks) if float(w[i]) != 0.0})  # one pass
                    emb = vision.image_embeddings(model, xs[sel], embed_batch)
                    for i, t in enumerate(tasks):
                        mine = task_of[sel] == i
                        if mine.any():
                            head, scale = heads[t]
                            pred = (scale * emb[mine.to(emb.device)] @ head.to(emb).T).argmax(-1).cpu()
                            correct[sel[mine]] = pred == ys[sel[mine]]
        finally:
            runtime.remove()
        acc = {t: float(correct[task_of == i].float().mean()) for i, t in enumerate(tasks)}
        results[mode] = (acc, routing_accuracy(weights_all, task_of))
    return results
