"""Stage artifacts through a DVC remote, for pool workers that do not share the workspace's
filesystem (``run.gpu.transfer: dvc``).

Parent (the pipeline, holding the workspace): before it hands a stage to the pool it commits the
upstream stages' outputs to its DVC cache and pushes them (``dvc commit -f`` / ``dvc push -r`` on
those stages); it passes the outputs' DVC hashes, the upstream stamps and the remote's URL to the
worker. Worker: keeps a DVC repository of its own per parent workspace (no git, the same remote),
pulls the inputs by hash, runs the stage with the same caching as the pipeline, ``dvc add``s and
pushes its outputs and returns their hashes and its stamp. Parent: pulls those hashes into a
scratch folder beside the outputs, checks their content against the worker's stamp and moves
them into place atomically. Data travels as DVC's content-addressed objects only, so a remote
already holding an input costs nothing to push again, and a worker already holding it pulls
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import replace_whole, write_json
from mergeflow.io.outputs import keep_tree
from mergeflow.stages import Layout, spec
from tasks import cache, version

REMOTE = "mergeflow"  # the remote's name inside a worker's repository
RETRY_DELAYS = (2.0, 8.0, 30.0)  # push and pull go over the network: retried with these waits


def dvc(args: list[str], cwd: Path, what: str, retry: bool = False) -> str:
    """``tasks.version.dvc``, with RETRY_DELAYS when ``retry`` (push, pull)."""
    return version.dvc(args, cwd, what, RETRY_DELAYS if retry else ())


def remote_url(root: Path, name: str) -> str:
    """The URL of the workspace's DVC remote ``name`` as DVC resolves it (local paths made absolute)."""
    for line in dvc(["remote", "list"], root, "reading the DVC remotes").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == name:
            return parts[1].strip()
    raise MergeflowError(f"params: run.dvc_remote: no DVC remote {name!r} in {root} (dvc remote add {name} URL)")


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def empty_dirs(root: Path, paths: list[Path]) -> list[str]:
    """The empty folders inside ``paths`` (DVC keeps files only; ``pull`` makes these again)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += [_rel(root, d) for d in sorted([path, *path.rglob("*")]) if d.is_dir() and not any(d.iterdir())]
    return found


def push_inputs(root: Path, stage: str, remote: str) -> dict[str, str]:
    """Commit and push the outputs of ``stage``'s upstream stages; returns ``{relative path: DVC hash}``."""
    ups = spec.upstream(stage)
    if not version.is_dvc_repo(root):
        raise MergeflowError(
            f"run.gpu.transfer: dvc needs the workspace {root} to be a DVC repository with dvc.yaml (git init && dvc init)"
        )
    dvc(["commit", "--force", *ups], root, f"committing the inputs of {stage}")
    dvc(["push", "-r", remote, *ups], root, f"pushing the inputs of {stage} to remote {remote!r}", retry=True)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    hashes = {}
    for up in ups:
        outs = {o["path"]: o for o in lock[up].get("outs", [])}
        for path in Layout(root).outs(up):
            entry = outs.get(_rel(root, path))
            if entry is None or "md5" not in entry:
                raise MergeflowError(f"dvc.lock: stage {up} has no hash for {_rel(root, path)} after dvc commit")
            hashes[_rel(root, path)] = entry["md5"]
    return hashes


def pull(root: Path, hashes: dict[str, str], remote: str, what: str, dirs: Sequence[str] = ()) -> None:
    """Fetch ``{relative path: DVC hash}`` from ``remote`` and put each in place at its path, whole
    (checked out into a scratch folder beside it, then swapped in; a killed pull leaves the old
    output, and the scratch folder is removed by the next run's clean-up); then make the empty
    folders ``dirs`` that DVC does not keep."""
    if not hashes:
        return
    scratch = Path(tempfile.mkdtemp(prefix=".transfer.", suffix=".tmp", dir=root / "artifacts"))
    try:
        targets = []
        for i, (rel, md5) in enumerate(sorted(hashes.items())):
            name = f"{i}-{Path(rel).name}"
            (scratch / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": name, "hash": "md5"}]}))
            targets.append(str((scratch / f"{name}.dvc").relative_to(root)))
        dvc(["pull", "--force", "-r", remote, *targets], root, what, retry=True)
        for i, (rel, _) in enumerate(sorted(hashes.items())):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            replace_whole(scratch / f"{i}-{Path(rel).name}", root / rel)
        for d in dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def add_and_push(root: Path, paths: list[Path], remote: str) -> dict[str, str]:
    """``dvc add`` the outputs (a worker's repository, no dvc.yaml) and push them; returns their hashes."""
    rels = [_rel(root, p) for p in paths]
    dvc(["add", *rels], root, "adding the stage outputs to the worker's DVC cache")
    dvc(
        ["push", "-r", remote, *(f"{r}.dvc" for r in rels)],
        root,
        f"pushing the stage outputs to {remote!r}",
        retry=True,
    )
    return {rel: yaml.safe_load((root / f"{rel}.dvc").read_text())["outs"][0]["md5"] for rel in rels}


def worker_root(base: str, experiment: str, origin: str) -> Path:
    """The worker's copy of one parent workspace: ``<base>/<experiment>-<hash of host:path>``."""
    key = hashlib.sha256(origin.encode()).hexdigest()[:10]
    return Path(os.path.expanduser(base)) / f"{experiment}-{key}"


def prepare_worker(root: Path, url: str, hashes: dict[str, str], stamps: dict[str, dict], dirs: Sequence[str] = ()) -> None:
    """Make ``root`` a DVC repository (no git) with the remote at ``url``, the inputs at ``hashes``
    and the parent's stamps of the upstream stages. Inputs already there with the same hash and
    untouched content are not pulled again."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        dvc(["init", "--no-scm"], root, "creating the worker's DVC repository")
    dvc(["remote", "add", "--force", "--default", REMOTE, url], root, "setting the worker's DVC remote")
    keep_tree(root / "artifacts")
    record = keep_tree(root / ".mergeflow") / "inputs.json"
    try:
        have = json.loads(record.read_text())
    except (OSError, ValueError):
        have = {}
    want = {}
    for rel, md5 in hashes.items():
        entry = have.get(rel)
        if not (entry and entry[0] == md5 and entry[1] == cache.outs_digest([root / rel], root)):
            want[rel] = md5
    pull(
        root,
        want,
        REMOTE,
        f"pulling the stage inputs from {url}",
        [d for d in dirs if any(d == rel or d.startswith(rel + "/") for rel in want)],
    )
    write_json(record, {rel: [md5, cache.outs_digest([root / rel], root)] for rel, md5 in hashes.items()})
    for up, stamp in stamps.items():
        write_json(cache.stamp_path(root, up), stamp)


def origin(root: Path) -> str:
    return f"{socket.gethostname()}:{Path(root).resolve()}"
