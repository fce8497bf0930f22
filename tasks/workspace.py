"""A workspace of the user's own: ``mergeflow init DIR`` scaffolds it (git, DVC, params.yaml,
dvc.yaml, mergeflow-code.yaml, .gitignore), and ``mergeflow run`` keeps its dvc.yaml and
mergeflow-code.yaml current (the local sources params name, the installed mergeflow's code).

Nothing here replaces a file mergeflow did not write: init refuses a folder holding any of the
files it would write; refresh rewrites dvc.yaml only when it carries init's header line.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_file
from mergeflow.params import Params
from mergeflow.stages import spec
from mergeflow.stages.layout import local_path
from tasks import version

PARAMS_TEMPLATE = """\
# mergeflow workspace (made by `mergeflow init`). `mergeflow run` runs the pipeline; `dvc repro`
# runs the same stages. Relative paths start at this file's folder. DVC tracks every section
# below: keep them (an empty one, {}, takes the defaults). What each key means: `mergeflow methods`,
# the README's "Your own models" and docs/data.md.
experiment: my-merges
seed: 0
device: auto  # cpu | cuda | auto
download:
  source: zoo://digits  # the built-in zoo; for your own models remove this line and fill in:
  # family: text_classification   # or clip_vision, causal_lm
  # base: models/base             # the pretrained model: a save_pretrained folder, or hf://org/name
  # tasks:
  #   sst:
  #     model: experts/sst        # a raw fine-tune (save_pretrained folder), head and all
  #     dataset: data/sst.csv     # a folder or one file: parquet, CSV, JSON lines (docs/data.md)
  #     text_columns: [sentence]  # one column, or two for a sentence pair
  #     label_column: label       # class ids, or the expert's label names
  # options: {max_length: 128, query_pool: 1000}
extract: {}
compress:
  drop: 0.6
merge:
  methods: [task_arithmetic, ties, tswitch]
evaluate: {}
run: {}
"""
GITIGNORE = "/.mergeflow/\n/artifacts/.mergeflow-output\n/mlflow.db\n/mlartifacts/\n__pycache__/\n"  # DVC ignores its own outputs
DVCIGNORE = "__pycache__\n*.pyc\n"
WRITES = ("params.yaml", "dvc.yaml", spec.CODE_FILE)


def _sh(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MergeflowError(f"{what} failed in {cwd}: {' '.join((proc.stderr or proc.stdout).split())[:300]}")


def init(folder: Path) -> list[str]:
    """Scaffold ``folder`` (made if missing); returns what was written or run."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MergeflowError(f"{folder}: exists and is not a folder")
    if taken := [name for name in WRITES if (folder / name).exists()]:
        raise MergeflowError(f"{folder / taken[0]}: exists; mergeflow init writes it and replaces nothing (init another folder)")
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    if not (folder / ".git").exists():
        _sh(["git", "init", "-q"], folder, "git init")
        done.append("git init")
    if not (folder / ".dvc").exists():
        version.dvc(["init"], folder, "dvc init")
        done.append("dvc init")
    (folder / "params.yaml").write_text(PARAMS_TEMPLATE)
    for name, text in ((".gitignore", GITIGNORE), (".dvcignore", DVCIGNORE)):
        if not (folder / name).exists():  # a user's own is left as it is
            (folder / name).write_text(text)
            done.append(name)
    from mergeflow.params import load_params

    refresh(load_params(folder / "params.yaml"), folder, force=True)
    return ["params.yaml", "dvc.yaml", spec.CODE_FILE, *done]


def is_own(root: Path) -> bool:
    """Whether ``root``'s dvc.yaml is one init wrote (and refresh may keep current)."""
    dvc_yaml = Path(root) / "dvc.yaml"
    return dvc_yaml.is_file() and dvc_yaml.read_text().startswith(spec.OWN_HEADER)


def local_sources(p: Params, root: Path) -> list[str]:
    """The local folders and files params name as sources: relative to ``root`` when inside it."""
    d = p.download
    refs = [d.base] + [spec_.get(k) for spec_ in d.tasks.values() for k in ("model", "dataset")] if d.family else []
    out: list[str] = []
    for ref in refs:
        if not isinstance(ref, str) or ref.startswith("hf://"):
            continue
        path = local_path(ref, root).resolve()
        try:
            dep = path.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            dep = str(path)  # outside the workspace: an external dependency (DVC hashes it as well)
        if dep not in out:
            out.append(dep)
    return out


def refresh(p: Params, root: Path, force: bool = False) -> list[str]:
    """Rewrite an own workspace's dvc.yaml and mergeflow-code.yaml where they differ from what
    params and the installed mergeflow say now; the names rewritten."""
    root = Path(root)
    if not force and not is_own(root):
        return []
    changed = []
    for name, text in (("dvc.yaml", spec.own_dvc_yaml(local_sources(p, root))), (spec.CODE_FILE, spec.code_record())):
        path = root / name
        if not path.exists() or path.read_text() != text:
            with atomic_file(path, user_file=True) as tmp:  # init's files, kept current
                tmp.write_text(text)
            changed.append(name)
    return changed


def check_sections(params_file: Path) -> None:
    """In a DVC workspace every section dvc.yaml tracks must be in the params file: DVC cannot
    commit a stage whose params are missing. A one-line error names the first."""
    root = Path(params_file).resolve().parent
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return
    data = yaml.safe_load(Path(params_file).read_text()) or {}
    wanted = [k for stage in spec.STAGES for k in spec.SPEC[stage].params]
    for key in dict.fromkeys(wanted):
        if key not in data:
            hint = {"seed": "0", "device": "auto"}.get(key, "{}")
            raise MergeflowError(
                f"{params_file}: no {key!r} key: dvc.yaml tracks it for DVC (write `{key}: {hint}` to keep the defaults)"
            )
