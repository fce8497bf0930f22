"""The pipeline's stages as plain library functions: download -> extract -> compress -> merge -> evaluate.

Each reads its inputs from the workspace's ``artifacts/`` tree, writes its outputs atomically
and returns a small JSON-able summary. Prefect tasks (``tasks/``) and ``dvc.yaml`` both call
these; nothing here knows about either.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mergeflow import methods
from mergeflow.codecs.switch import load_switch, save_switch
from mergeflow.errors import MergeflowError
from mergeflow.io import hub
from mergeflow.io.atomic import atomic_dir, write_json
from mergeflow.io.outputs import check_apart, check_replaceable, keep_tree, read_marker
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
    """Resolve the sources into ``artifacts/``: build the zoo from the seed for ``zoo://``; for a
    model family resolve every hub ref to a commit (local folders to a content fingerprint), let
    the family write checkpoints, heads and data, and pin it all in ``sources.json``."""
    lay = Layout(root)
    if p.download.family is not None:
        sources, pins = resolve_sources(p, log, root)  # refs checked before anything is written
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=keep_tree(lay.artifacts)))
    try:
        if p.download.family is None:
            from mergeflow.zoo import ZooSpec, build_zoo

            manifest = build_zoo(tmp, seed=p.seed, spec=ZooSpec(**p.download.zoo), progress=log)
            manifest = {**manifest, "family": "zoo", "source": p.download.source}
        else:
            from mergeflow.models import get_family

            family = get_family(p.download.family)
            facts = family.prepare(sources, tmp, log)
            manifest = {"family": family.name, "source": "family", "tasks": list(sources.tasks), **pins, **facts}
        for out in (lay.checkpoints, lay.heads, lay.data):
            (tmp / out.name).mkdir(exist_ok=True)
            with atomic_dir(out, kind="stage:download") as dst:
                dst.rmdir()
                os.replace(tmp / out.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(lay.sources, manifest)
    return {"tasks": manifest["tasks"], "family": manifest["family"]}


def check_sources_apart(lay: Layout, ref: str, path: Path, where: str) -> None:
    """A local source may not be, hold or lie inside the workspace's outputs or its state."""
    for out in (*lay.outs("download"), lay.root / ".mergeflow"):
        try:
            check_apart(out, [path])
        except MergeflowError as exc:
            raise MergeflowError(f"params: {where}: {ref}: {exc}") from None


def preflight(p: Params, root: Path, names: tuple[str, ...] | list[str] = STAGES) -> None:
    """Everything about the workspace that can be checked before any work: no output of these
    stages is in the way (:meth:`Layout.claim`), and no local source overlaps an output."""
    lay = Layout(Path(root))
    lay.claim(names)
    d = p.download
    if "download" in names and d.family is not None:
        refs = [("download.base", d.base)] + [(f"download.tasks.{t}.{k}", spec.get(k)) for t, spec in d.tasks.items()
                                              for k in ("model", "dataset")]
        for where, ref in refs:
            if isinstance(ref, str) and not ref.startswith("hf://") and Path(ref).expanduser().exists():
                check_sources_apart(lay, ref, Path(ref).expanduser(), where)


def resolve_sources(p: Params, log: Log = _noop, root: Path | None = None):
    """(``Sources`` for the family, their pins for sources.json): every ``hf://`` ref resolved to the
    commit it points at now (only the local cache when ``download.offline`` or HF_HUB_OFFLINE is
    set), every local folder fingerprinted by content."""
    from mergeflow.models import get_family
    from mergeflow.models.family import Source, Sources, TaskSources

    d = p.download
    family = get_family(d.family)
    offline = True if d.offline else None
    pins: dict = {"base": None, "refs": {}}

    def one(ref: str, kind: str, where: str, subfolder: str | None = None) -> tuple[Source, dict]:
        if ref.startswith("hf://"):
            repo_type, repo, revision = hub.parse_ref(ref)
            if repo_type != kind:
                want = "hf://org/name[@revision]" if kind == "model" else "hf://datasets/org/name[@revision]"
                raise MergeflowError(f"params: {where}: {ref} is a {repo_type} ref, expected a {kind} ({want})")
            # a task option `subfolder` (one repo, a checkpoint per folder) fetches that folder only
            r = hub.resolve(repo, repo_type, revision, offline=offline, subfolder=subfolder if isinstance(subfolder, str) else None)
            log(f"download: {ref} -> {r.commit}")
            pin = {"ref": ref, "repo": r.repo, "repo_type": r.repo_type, "revision": r.revision, "commit": r.commit,
                   "pinned_ref": r.pinned_ref}
            return Source(ref, r.path, commit=r.commit), pin
        path = Path(ref).expanduser()
        if not path.exists():
            raise MergeflowError(f"params: {where}: {ref}: no such file or folder (and not an hf:// ref)")
        if root is not None:  # the stage's outputs never overlap what it reads
            check_sources_apart(Layout(root), ref, path, where)
        digest = fingerprint(path)
        log(f"download: {ref} (local) -> sha256 {digest[:12]}")
        return Source(ref, path.resolve(), fingerprint=digest), {"ref": ref, "path": str(path.resolve()), "sha256": digest}

    base, pins["base"] = one(d.base, "model", "download.base")
    tasks = {}
    for name, spec in d.tasks.items():
        model, model_pin = one(spec["model"], "model", f"download.tasks.{name}.model", spec.get("subfolder"))
        dataset, dataset_pin = (None, None)
        if spec.get("dataset"):
            dataset, dataset_pin = one(spec["dataset"], "dataset", f"download.tasks.{name}.dataset")
        options = {**family.task_options, **{k: v for k, v in spec.items() if k not in ("model", "dataset")}}
        tasks[name] = TaskSources(name, model, dataset, options)
        pins["refs"][name] = {"model": model_pin, "dataset": dataset_pin}
    sources = Sources(family.name, base, tasks, {**family.options, **d.options}, seed=p.seed)
    return sources, pins


def upstream_state(p: Params, digest: Callable[[Path], str] | None = None) -> dict | None:
    """What the download stage's sources are now, without downloading anything: every ``hf://``
    ref's current commit (the hub's, or offline the local cache's; None when not cached) and
    every local folder's content digest (``digest``, default :func:`fingerprint`). None for the zoo.

    A scheduled run compares this with the last run's: equal means nothing upstream changed."""
    d = p.download
    if d.family is None:
        return None
    offline = True if d.offline else None

    def one(ref: str | None) -> str | None:
        if not ref:
            return None
        if ref.startswith("hf://"):
            repo_type, repo, revision = hub.parse_ref(ref)
            return hub.head_commit(repo, repo_type, revision, offline=offline)
        path = Path(ref).expanduser()
        return (digest or fingerprint)(path) if path.exists() else None

    return {"base": one(d.base), "tasks": {t: [one(spec.get("model")), one(spec.get("dataset"))] for t, spec in d.tasks.items()}}


def fingerprint(path: Path) -> str:
    """sha256 over a file's, or a folder's files', relative paths and contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# --- fan-out: a stage as independent units -----------------------------------------------
#
# extract, compress, merge and evaluate split into units (one per task, method or evaluated
# model) that read their inputs from the workspace and write into the stage's work folder, so a
# task runner (threads, Dask) can run them at once, in other processes too. ``finish`` assembles
# what the units returned; the work folder replaces the stage's output whole (atomically).

Map = Callable[[Callable[[str], dict], list[str]], list[dict]]


def _sequential(fn: Callable[[str], dict], items: list[str]) -> list[dict]:
    return [fn(x) for x in items]


def units(stage: str, p: Params, root: Path) -> list[str]:
    """The independent units of ``stage``: tasks (extract, compress + the query set), methods
    (merge), evaluated models (evaluate: experts, base, each method)."""
    lay = Layout(root)
    if stage == "extract":
        return tasks_of(p, lay)
    if stage == "compress":
        return [*tasks_of(p, lay), QUERIES_UNIT]
    if stage == "merge":
        return list(p.merge.methods)
    if stage == "evaluate":
        return ["experts", "base", *p.merge.methods]
    raise MergeflowError(f"stage {stage!r} has no units (stages with units: extract, compress, merge, evaluate)")


def run_unit(stage: str, p: Params, root: Path, unit: str, work: Path, log: Log = _noop) -> dict:
    """One unit of ``stage``, writing into ``work`` (the stage's output being built); JSON-able result."""
    fn = {"extract": _extract_unit, "compress": _compress_unit, "merge": _merge_unit, "evaluate": _evaluate_unit}[stage]
    return fn(p, Layout(Path(root)), unit, Path(work), log)


def finish(stage: str, p: Params, root: Path, work: Path, results: dict[str, dict], log: Log = _noop) -> dict:
    """Assemble the units' results into the stage's summary (and its files in ``work``)."""
    fn = {"extract": _extract_finish, "compress": _compress_finish, "merge": _merge_finish, "evaluate": _evaluate_finish}[stage]
    return fn(p, Layout(Path(root)), Path(work), results, log)


def run_stage_units(stage: str, p: Params, root: Path, log: Log = _noop, map_units: Map | None = None) -> dict:
    """The whole stage: its units through ``map_units`` (default: one after another), then ``finish``."""
    lay = Layout(root)
    names = units(stage, p, root)
    with atomic_dir(lay.outs(stage)[0], kind=f"stage:{stage}") as work:
        results = (map_units or _sequential)(lambda u: run_unit(stage, p, root, u, work, log), names)
        return finish(stage, p, root, work, dict(zip(names, results)), log)


# --- extract ----------------------------------------------------------------------------

def extract(p: Params, root: Path, log: Log = _noop, map_units: Map | None = None) -> dict:
    """Task vectors tau_t = theta_t - theta_0 for every task, as float32 safetensors."""
    return run_stage_units("extract", p, root, log, map_units)


def _extract_unit(p: Params, lay: Layout, task: str, work: Path, log: Log) -> dict:
    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    n = extract_task_vector(base, Checkpoint(lay.checkpoints / task), work / f"{task}.safetensors", {"task": task})
    log(f"extract: {task}: {n:,} parameters")
    return {"n_params": n}


def _extract_finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    return {"n_params": {t: r["n_params"] for t, r in results.items()}}


# --- compress ---------------------------------------------------------------------------

QUERIES_UNIT = "queries"  # the compress unit that builds Auto-Switch's query set


def compress(p: Params, root: Path, log: Log = _noop, map_units: Map | None = None) -> dict:
    """T-Switch every task vector and store it in the binary switch format; Auto-Switch's query set beside."""
    return run_stage_units("compress", p, root, log, map_units)


def _compress_unit(p: Params, lay: Layout, unit: str, work: Path, log: Log) -> dict:
    if unit == QUERIES_UNIT:
        queries = build_queries(p, lay)
        queries.save(work / QUERIES_NAME)
        log(f"compress: Auto-Switch query set: {p.compress.queries} per task, {queries.nbytes:,} bytes")
        return {"bytes": queries.nbytes}
    task = unit
    vec = Checkpoint(_require(lay.vectors / f"{task}.safetensors", "extract"))
    switch = tswitch.compress(vec.items(), p.compress.drop, metadata={"task": task})
    st = save_switch(work / f"{task}{SWITCH_SUFFIX}", switch, encoding=p.compress.encoding)
    n = sum(t.numel() for _, t in vec.items())
    stats = {
        "bits_per_param": st.bits_per_param,
        "entropy_floor_bits": st.entropy_floor_bits,
        "keep_fraction": st.n_kept / max(st.n_params, 1),
        "file_bytes": st.file_bytes,
        "float32_bytes": 4 * n,
        "ratio_to_float32": st.file_bytes / (4 * n),
    }
    log(f"compress: {task}: {st.bits_per_param:.3f} bits/param (floor {st.entropy_floor_bits:.3f}), "
        f"{st.file_bytes:,} bytes = {stats['ratio_to_float32']:.4f} of float32")
    return stats


def _compress_finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    stats = {t: r for t, r in results.items() if t != QUERIES_UNIT}
    write_json(work / "stats.json", {"drop": p.compress.drop, "encoding": p.compress.encoding, "tasks": stats})
    return stats


def build_queries(p: Params, lay: "Layout"):
    """Auto-Switch's query set: ``compress.queries`` train rows per task, embedded by the base."""
    from mergeflow.autoswitch import query_rows, sample_queries

    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    fam = family_of(lay, resolve_device(p.device), p.evaluate.batch_size)
    model = fam.build(base.state_dict())
    train = {}
    for i, task in enumerate(tasks_of(p, lay)):
        data = fam.load_data(task, "train")
        if len(data) == 0:
            raise MergeflowError(f"{lay.data / task}: no train rows for Auto-Switch's query set")
        train[task] = fam.features(model, data, query_rows(len(data), p.compress.queries, p.seed, i))
    return sample_queries(train, p.compress.queries, seed=p.seed)


def family_of(lay: Layout, device, batch_size: int = 256):
    """The model family that wrote the artifacts (sources.json), ready to evaluate."""
    from mergeflow.models import get_family

    sources = json.loads(_require(lay.sources, "download").read_text())
    return get_family(sources.get("family", "zoo"))(lay.artifacts, device, batch_size)


# --- merge ------------------------------------------------------------------------------

def merge(p: Params, root: Path, log: Log = _noop, map_units: Map | None = None) -> dict:
    """Every method in ``merge.methods``; static ones write a checkpoint, dynamic ones per-task forms."""
    return run_stage_units("merge", p, root, log, map_units)


def _merge_unit(p: Params, lay: Layout, name: str, work: Path, log: Log) -> dict:
    tasks = tasks_of(p, lay)
    base = Checkpoint(_require(lay.checkpoints / "base", "download"))
    method = methods.get(name)
    dst = work / name
    if name in ("tswitch", "autoswitch"):
        # T-Switch's compact form is the switches themselves: the task model is built on load;
        # Auto-Switch keeps its query set beside them.
        dst.mkdir()
        files = [f"{task}{SWITCH_SUFFIX}" for task in tasks] + ([QUERIES_NAME] if name == "autoswitch" else [])
        for f in files:
            shutil.copyfile(_require(lay.switches / f, "compress"), dst / f)
        storage = sum((dst / f).stat().st_size for f in files)
        info = {"store": "switches", "drop": p.compress.drop}
        if name == "autoswitch":
            info |= {k: v for k, v in p.merge.hyper(name).items() if k != "drop"} | {"queries": p.compress.queries}
    elif name in ("tvq", "rtvq"):
        hp = p.merge.hyper(name)
        storage, info = _quantised_merge(p, lay, name, hp, tasks, base, dst)
    else:
        hp = p.merge.hyper(name)
        sources = [TaskVectors.from_vector(base, _require(lay.vectors / f"{t}.safetensors", "extract")) for t in tasks]
        with tempfile.TemporaryDirectory(dir=work, prefix=".exemplars-") as tmp:
            data = exemplar_stats(p, lay, tasks, hp["exemplars"], base.names(), Path(tmp), log) \
                if method.needs == "layer_inputs" else None
            merge_to_disk(method, base, sources, hp, dst, resolve_device(p.device), metadata={"tasks": ",".join(tasks)},
                          data=data)
        n, itemsize = _floating_params(base)
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

    vectors = [Checkpoint(_require(lay.vectors / f"{t}.safetensors", "extract")) for t in tasks]
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
                   log: Log = _noop) -> list:
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
        model = fam.build(Checkpoint(_require(lay.checkpoints / task, "download")).state_dict())
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


def _merge_finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    return dict(results)


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


def evaluate(p: Params, root: Path, log: Log = _noop, map_units: Map | None = None) -> dict:
    """The task metric of the base, every expert and every method on each task's test split
    (accuracy, a GLUE metric or 1/perplexity: the family's ``score``); metrics.json, per_task.csv, plots."""
    return run_stage_units("evaluate", p, root, log, map_units)


_EVAL_LOCK = threading.Lock()
_EVAL_INPUTS: dict = {}


def _eval_inputs(p: Params, lay: Layout):
    """(family, test data per task, base state dict), loaded once per process and shared by the
    evaluate units that run in it (threads): images are decoded and resized once, not per model."""
    tasks = tasks_of(p, lay)
    base_file = _require(lay.checkpoints / "base", "download")
    key = (str(lay.artifacts.resolve()), str(resolve_device(p.device)), p.evaluate.batch_size, p.evaluate.limit,
           tuple(tasks), fingerprint(lay.sources))
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


def _evaluate_unit(p: Params, lay: Layout, unit: str, work: Path, log: Log) -> dict:
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
    meta = json.loads(_require(lay.merged / unit / "method.json", "merge").read_text())
    if unit == "autoswitch":
        modes = evaluate_autoswitch(lay, tasks, meta, fam, base_sd, data, p.seed)
        return {"storage": meta["storage_bytes"], "modes": {m: {"scores": r, "routing": a} for m, (r, a) in modes.items()}}
    return {"storage": meta["storage_bytes"], "scores": {t: score(sd, t) for t, sd in task_state_dicts(lay, unit, tasks, base_sd)}}


def _evaluate_finish(p: Params, lay: Layout, work: Path, results: dict, log: Log) -> dict:
    from mergeflow import evaluate as ev

    tasks = tasks_of(p, lay)
    n, _ = _floating_params(Checkpoint(_require(lay.checkpoints / "base", "download")))
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


def evaluate_autoswitch(lay: Layout, tasks: list[str], meta: dict, fam, base_sd: dict[str, torch.Tensor],
                        data: dict, seed: int) -> dict:
    """Auto-Switch on shuffled mixed-task test batches, in every routing mode.

    Each input is routed by the base model's features (the family's ``features``); in each batch
    every distinct switch combination is applied once, in place, to one model
    (``mergeflow.runtime``), and each input is scored with its own task's head and metric.
    Returns {mode: ({task: score dict}, routing accuracy)}.
    """
    from mergeflow.autoswitch import MODES, QuerySet, combine, group_rows, route, routing_accuracy
    from mergeflow.runtime import SwitchRuntime

    folder = lay.merged / "autoswitch"
    queries = QuerySet.load(folder / QUERIES_NAME)
    if queries.tasks != tasks:
        raise MergeflowError(f"{folder / QUERIES_NAME}: query set tasks {queries.tasks} differ from {tasks}")
    switches = {t: load_switch(folder / f"{t}{SWITCH_SUFFIX}") for t in tasks}
    model = fam.build({k: v.clone() for k, v in base_sd.items()})
    runtime = SwitchRuntime(fam.tensors(model), switches, workers=1)  # small models: no thread hand-offs
    task_of = torch.cat([torch.full((len(data[t]),), i) for i, t in enumerate(tasks)])
    row_of = torch.cat([torch.arange(len(data[t])) for t in tasks])
    order = torch.randperm(len(task_of), generator=torch.Generator().manual_seed(seed))
    routed = route(queries, torch.cat([fam.features(model, data[t]) for t in tasks]), meta["k"])
    results = {}
    for mode in MODES:
        outputs: dict[str, list] = {t: [] for t in tasks}
        weights_all = torch.empty_like(routed)
        try:
            for start in range(0, len(order), meta["batch_size"]):
                rows = order[start:start + meta["batch_size"]]
                weights = combine(routed[rows], mode)
                weights_all[rows] = weights
                for w, idx in group_rows(weights):
                    sel = rows[idx]
                    runtime.switch({t: float(w[i]) for i, t in enumerate(tasks) if float(w[i]) != 0.0})  # one pass
                    for i, t in enumerate(tasks):
                        mine = row_of[sel[task_of[sel] == i]]
                        if len(mine):
                            outputs[t].append((mine, fam.predict(model, t, data[t], mine)))
        finally:
            runtime.remove()
        scores = {}
        for t in tasks:
            rows_t = torch.cat([r for r, _ in outputs[t]])
            outs = torch.cat([o for _, o in outputs[t]])
            ordered = torch.empty_like(outs)
            ordered[rows_t] = outs
            scores[t] = fam.score(t, ordered, data[t])
        results[mode] = (scores, routing_accuracy(weights_all, task_of))
    return results
