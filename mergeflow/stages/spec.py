"""The one table of what each stage reads, runs and writes; dvc.yaml is generated from it.

A stage's **code** is its module and every mergeflow module it imports, transitively: import
statements anywhere in a module (also inside functions), and module names written as strings
(the families' table, loaded with importlib), and every module of a package that imports all
of its modules (``pkgutil.iter_modules``: mergeflow/methods, where a new method is a new file;
dvc.yaml lists such a package as one folder). The stage modules themselves are
loaded by name (``mergeflow.stages.units``), so one stage's code never includes another's.
``mergeflow run`` (tasks/cache.py) and ``dvc repro`` (dvc.yaml's ``deps``) both use this table,
so they agree on what is stale. ``python -m mergeflow.stages.spec`` rewrites dvc.yaml.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from mergeflow.stages.layout import STAGES, Layout

PACKAGE = Path(__file__).resolve().parents[1]  # the mergeflow package folder
_MODULE_STRING = re.compile(r"(mergeflow(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?::[A-Za-z_][A-Za-z0-9_]*)?")  # "pkg.mod[:attr]"


@dataclass(frozen=True)
class StageSpec:
    params: tuple[str, ...]  # the params.yaml sections it reads
    reads: tuple[str, ...]  # the Layout outputs it reads (attribute names)


SPEC: dict[str, StageSpec] = {
    "download": StageSpec(("seed", "download"), ()),
    "extract": StageSpec(("extract",), ("checkpoints", "sources")),
    "compress": StageSpec(("seed", "device", "extract", "compress"), ("vectors", "checkpoints", "heads", "data", "sources")),
    "merge": StageSpec(
        ("seed", "device", "extract", "merge"), ("checkpoints", "heads", "data", "vectors", "switches", "sources")
    ),
    "evaluate": StageSpec(
        ("seed", "device", "extract", "merge", "evaluate"), ("checkpoints", "heads", "data", "switches", "merged", "sources")
    ),
}
assert tuple(SPEC) == STAGES


def reads(stage: str, lay: Layout) -> list[Path]:
    return [getattr(lay, name) for name in SPEC[stage].reads]


def upstream(stage: str) -> list[str]:
    """The stages whose outputs ``stage`` reads, in pipeline order."""
    lay = Layout(Path("."))
    mine = set(reads(stage, lay))
    return [s for s in STAGES if mine & set(lay.outs(s))]


# --- code ---------------------------------------------------------------------------------


def _file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for f in (PACKAGE / rel / "__init__.py", (PACKAGE / rel).with_suffix(".py")):
        if f.is_file() and rel.parts:
            return f
    return PACKAGE / "__init__.py" if module == "mergeflow" else None


def discovers(path: Path) -> bool:
    """Whether ``path`` is a package ``__init__`` that imports every module beside it."""
    return path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text()


def _imported(path: Path, module: str) -> set[str]:
    """The mergeflow modules ``path`` (module ``module``) names in imports or as strings."""
    st = path.stat()  # parsed once per process and file version: every stage's walk shares the parse
    found = set(_named(path, module, st.st_mtime_ns, st.st_size))
    if discovers(path):
        found.update(f"{module}.{f.stem}" for f in path.parent.glob("*.py") if f.name != "__init__.py")
    return {m for m in found if m.split(".")[0] == "mergeflow" and _file(m) is not None}


@functools.lru_cache(maxsize=None)
def _named(path: Path, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    """Every module name the file's imports and strings give (a function of its content)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := _MODULE_STRING.fullmatch(node.value)):
            found.add(m.group(1))
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def code_files(stage: str) -> tuple[Path, ...]:
    """Every library file the stage runs (its module, what it imports, and their packages)."""
    todo, seen = [f"mergeflow.stages.{stage}"], set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages run first
            name = ".".join(parts[:i])
            file = _file(name)
            if name in seen or file is None:
                continue
            seen.add(name)
            todo.extend(_imported(file, name) - seen)
    return tuple(sorted({f for m in seen if (f := _file(m)) is not None}))  # every module in seen has a file


def code_deps(stage: str) -> list[str]:
    """The stage's code as dvc.yaml lists it: files, and a discovering package as its folder."""
    deps: list[str] = []
    for f in code_files(stage):
        package = f.parent / "__init__.py"
        dep = f.parent if package.is_file() and discovers(package) else f
        rel = dep.relative_to(PACKAGE.parent).as_posix()
        if rel not in deps:
            deps.append(rel)
    return deps


def code_digest(stage: str) -> str:
    """Hash of the stage's code files (relative path and content): what staleness compares."""
    h = hashlib.sha256()
    for f in code_files(stage):
        h.update(f.relative_to(PACKAGE.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# --- dvc.yaml --------------------------------------------------------------------------------

_EVALUATE_EXTRA = """    metrics:
      - artifacts/eval/metrics.json:
          cache: false
    plots:
      - artifacts/eval/per_task.csv:
          cache: false
          template: bar_horizontal
          x: acc
          y: task
      - artifacts/eval/plots:
          cache: false
"""


def dvc_yaml() -> str:
    """dvc.yaml as this table says: each stage's data and code deps, params and outs."""
    lay = Layout(Path("."))

    def rel(p: Path) -> str:
        return p.as_posix()

    lines = [
        "# Generated from mergeflow/stages/spec.py (python -m mergeflow.stages.spec): edit the table there.",
        "# The same stages the Prefect flow runs (`mergeflow run`); `dvc repro` reruns only what changed.",
        "stages:",
    ]
    for stage in STAGES:
        lines += [f"  {stage}:", f"    cmd: mergeflow stage {stage}", "    deps:"]
        lines += [f"      - {rel(p)}" for p in reads(stage, lay)]
        lines += [f"      - {dep}" for dep in code_deps(stage)]
        lines += ["    params:"] + [f"      - {k}" for k in SPEC[stage].params]
        if stage == "evaluate":  # artifacts/eval: its metrics and plots, kept in git rather than the DVC cache
            lines.append(_EVALUATE_EXTRA.rstrip("\n"))
        else:
            lines += ["    outs:"] + [f"      - {rel(p)}" for p in lay.outs(stage)]
    return "\n".join(lines) + "\n"


# --- a workspace of the user's own (mergeflow init) -----------------------------------------

OWN_HEADER = "# Generated by mergeflow init for this workspace; `mergeflow run` keeps it current (edit params.yaml)."
CODE_FILE = "mergeflow-code.yaml"  # the installed mergeflow each stage runs: a params file DVC tracks


def code_record() -> str:
    """``mergeflow-code.yaml``: the installed mergeflow's version and each stage's code digest. A
    workspace of the user's own depends on these instead of on source files it does not have."""
    from mergeflow import __version__

    lines = [
        "# Written by mergeflow (init, run): the mergeflow whose code each stage runs. DVC tracks it",
        "# (dvc.yaml's params), so a new mergeflow makes the stages whose code changed stale.",
        f"version: {__version__}",
    ]
    lines += [f"{stage}: {code_digest(stage)}" for stage in STAGES]
    return "\n".join(lines) + "\n"


def own_dvc_yaml(local_sources: list[str]) -> str:
    """dvc.yaml for a workspace of the user's own: the same stages, their code through
    ``mergeflow-code.yaml``, and the local sources (content-hashed by DVC) as the download stage's deps."""
    lay = Layout(Path("."))
    lines = [OWN_HEADER, "stages:"]
    for stage in STAGES:
        deps = [p.as_posix() for p in reads(stage, lay)] + (list(local_sources) if stage == "download" else [])
        lines += [f"  {stage}:", f"    cmd: mergeflow stage {stage}"]
        if deps:
            lines += ["    deps:"] + [f"      - {_quote(d)}" for d in deps]
        lines += (
            ["    params:"] + [f"      - {k}" for k in SPEC[stage].params] + [f"      - {CODE_FILE}:", f"          - {stage}"]
        )
        if stage == "evaluate":
            lines.append(_EVALUATE_EXTRA.rstrip("\n"))
        else:
            lines += ["    outs:"] + [f"      - {p.as_posix()}" for p in lay.outs(stage)]
    return "\n".join(lines) + "\n"


def _quote(path: str) -> str:
    import json

    return path if re.fullmatch(r"[A-Za-z0-9_./~-]+", path) else json.dumps(path)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--check"]:  # pre-commit: refuse a stale dvc.yaml
        if Path("dvc.yaml").read_text() != dvc_yaml():
            sys.exit("dvc.yaml is stale: python -m mergeflow.stages.spec")
        sys.exit(0)
    from mergeflow.io.atomic import atomic_file

    with atomic_file(Path("dvc.yaml"), user_file=True) as tmp:  # the project's file, regenerated as asked
        tmp.write_text(dvc_yaml())
    print(f"wrote dvc.yaml ({len(STAGES)} stages)")
