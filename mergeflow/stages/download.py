"""download: resolve the sources into ``artifacts/`` (the zoo, or a model family's checkpoints,
heads and data), every hub ref pinned to a commit and every local folder to a content hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mergeflow.errors import MergeflowError
from mergeflow.io import hub
from mergeflow.io.atomic import atomic_dir, write_json
from mergeflow.io.outputs import keep_tree
from mergeflow.params import Params, split_options
from mergeflow.stages.layout import Layout, Log, check_sources_apart, local_path, noop


def run(p: Params, root: Path, log: Log = noop, map_units=None) -> dict:
    """Resolve the sources into ``artifacts/``: build the zoo from the seed for ``zoo://``; for a
    model family resolve every hub ref to a commit (local folders to a content fingerprint), let
    the family write checkpoints, heads and data, and pin it all in ``sources.json``."""
    lay = Layout(root)
    if p.download.family is not None:
        sources, pins = resolve_sources(p, log, root)  # refs checked before anything is written
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=keep_tree(lay.artifacts)))
    try:
        if p.download.family is None:
            from mergeflow.stages import zoo_cache
            from mergeflow.zoo import ZooSpec

            manifest = zoo_cache.build(tmp, p.seed, ZooSpec(**p.download.zoo), log)  # built once per machine and spec
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


def resolve_sources(p: Params, log: Log = noop, root: Path | None = None):
    """(``Sources`` for the family, their pins for sources.json): every ``hf://`` ref resolved to the
    commit it points at now (only the local cache when ``download.offline`` or HF_HUB_OFFLINE is
    set), every local folder fingerprinted by content."""
    from mergeflow.models import get_family
    from mergeflow.models.family import Source, Sources, TaskSources

    d = p.download
    assert d.family is not None and d.base is not None  # called for a family, whose params give a base (validated)
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
            r = hub.resolve(
                repo, repo_type, revision, offline=offline, subfolder=subfolder if isinstance(subfolder, str) else None
            )
            log(f"download: {ref} -> {r.commit}")
            pin = {
                "ref": ref,
                "repo": r.repo,
                "repo_type": r.repo_type,
                "revision": r.revision,
                "commit": r.commit,
                "pinned_ref": r.pinned_ref,
            }
            return Source(ref, r.path, commit=r.commit), pin
        path = local_path(ref, root)
        if not path.exists():
            hint = (
                f" (relative paths start at the params file's folder, {root})"
                if root is not None and not Path(ref).expanduser().is_absolute()
                else ""
            )
            raise MergeflowError(f"params: {where}: {ref}: no such file or folder (and not an hf:// ref){hint}")
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
        options = {**family.task_options, **{k: v for k, v in split_options(spec).items() if k not in ("model", "dataset")}}
        tasks[name] = TaskSources(name, model, dataset, options)
        pins["refs"][name] = {"model": model_pin, "dataset": dataset_pin}
    sources = Sources(family.name, base, tasks, {**family.options, **d.options}, seed=p.seed)
    return sources, pins


def upstream_state(p: Params, digest: Callable[[Path], str | None] | None = None, root: Path | None = None) -> dict | None:
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
        path = local_path(ref, root)
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
