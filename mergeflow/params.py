"""params.yaml: one section per stage plus ``experiment``, ``seed`` and ``device`` (a contract).

Every key is validated before any work starts; an unknown key or a bad value is a one-line
error naming the key path, e.g. ``params.yaml: merge.task_arithmetic.scaling: ...``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow import methods
from mergeflow.errors import MergeflowError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_RESERVED = ("base", "_frozen")


class DownloadParams(_Section):
    """Either the built-in zoo (``source: zoo://digits``) or a model family from the hub or local
    folders (``family``, ``base``, ``tasks``; see docs/families.md and presets/)."""

    source: Optional[str] = Field(None, description="zoo://digits (the default when no family is given)")
    zoo: dict[str, Any] = Field(default_factory=dict, description="overrides of the zoo's ZooSpec fields")
    family: Optional[str] = Field(None, description="clip_vision | text_classification | causal_lm")
    base: Optional[str] = Field(None, description="the pretrained model: hf://org/name[@revision] or a local folder")
    tasks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="task -> {model: ref, dataset: ref, ...family task options}"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="family-wide options")
    offline: bool = Field(False, description="use only the local Hugging Face cache (as HF_HUB_OFFLINE=1)")

    @field_validator("source")
    @classmethod
    def _source(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("zoo://"):
            raise ValueError(f"unsupported source {v!r} (zoo://digits; for hub or local models set family, base and tasks)")
        return v

    @field_validator("zoo")
    @classmethod
    def _zoo(cls, v: dict[str, Any]) -> dict[str, Any]:
        from mergeflow.zoo import ZooSpec

        fields = {f.name: f for f in dataclasses.fields(ZooSpec)}
        for key, value in v.items():
            if key not in fields:
                raise ValueError(f"unknown zoo option {key!r} (known: {', '.join(fields)})")
            want = type(fields[key].default)
            if fields[key].default is None and (value is None or isinstance(value, int) and not isinstance(value, bool)):
                continue  # optional integer options (e.g. max_samples)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
                raise ValueError(f"zoo option {key} expects {want.__name__}, got {value!r}")
        return v

    @model_validator(mode="after")
    def _family(self) -> "DownloadParams":
        if self.family is None:
            for key in ("base", "tasks", "options"):
                if getattr(self, key):
                    raise ValueError(f"{key}: only with a family (set download.family, or remove {key})")
            if self.source is None:
                self.source = "zoo://digits"
            return self
        if self.source is not None:
            raise ValueError("source: give either source (zoo://) or family, not both")
        if self.zoo:
            raise ValueError("zoo: zoo options apply to zoo:// sources only")
        from mergeflow.models import get_family

        try:
            fam = get_family(self.family)
        except MergeflowError as exc:
            raise ValueError(f"family: {exc}") from None
        if fam.name == "zoo":
            raise ValueError("family: the zoo is chosen with source: zoo://digits")
        if not self.base:
            raise ValueError("base: required with a family (hf://org/name[@revision] or a local folder)")
        if not self.tasks:
            raise ValueError("tasks: at least one task is required with a family")
        for key in self.options:
            if key not in fam.options:
                raise ValueError(
                    f"options.{key}: unknown option of family {fam.name} (known: {', '.join(fam.options) or 'none'})"
                )
        for task, spec in self.tasks.items():
            if not _TASK_NAME.fullmatch(task) or task in _RESERVED:
                raise ValueError(f"tasks.{task}: not a usable task name (letters, digits, _ . -; not {' or '.join(_RESERVED)})")
            if not isinstance(spec, dict):
                raise ValueError(f"tasks.{task}: expected a mapping with model and dataset, got {spec!r}")
            if not isinstance(spec.get("model"), str) or not spec["model"]:
                raise ValueError(f"tasks.{task}.model: required (hf://org/name[@revision] or a local folder)")
            if "dataset" in spec and spec["dataset"] is not None and not isinstance(spec["dataset"], str):
                raise ValueError(f"tasks.{task}.dataset: expected a ref string, got {spec['dataset']!r}")
            if "splits" in spec:
                _check_splits(f"tasks.{task}", spec)
            for key in spec:
                if key not in ("model", "dataset", "splits") and key not in fam.task_options:
                    raise ValueError(
                        f"tasks.{task}.{key}: unknown task option of family {fam.name} "
                        f"(known: model, dataset{''.join(', ' + k for k in fam.task_options)})"
                    )
        return self

    @property
    def family_name(self) -> str:
        return self.family or "zoo"


SPLIT_ROLES = {"validation": "split", "test": "split", "evaluation": "split", "train": "train_split"}


def _check_splits(where: str, spec: dict) -> None:
    """``splits: {validation: <name>, train: <name>}``: the dataset's own split names for the
    evaluation split (``validation``, ``test`` or ``evaluation``) and the query pool (``train``)."""
    splits = spec["splits"]
    if not isinstance(splits, dict) or not all(isinstance(v, str) and v for v in splits.values()):
        raise ValueError(f"{where}.splits: expected a mapping like {{validation: dev, train: training}}, got {splits!r}")
    for role in splits:
        if role not in SPLIT_ROLES:
            raise ValueError(f"{where}.splits.{role}: not one of {', '.join(SPLIT_ROLES)}")
    evals = [r for r in splits if SPLIT_ROLES[r] == "split"]
    if len(evals) > 1:
        raise ValueError(f"{where}.splits: {' and '.join(evals)} both name the evaluation split; give one")
    for role in splits:
        if SPLIT_ROLES[role] in spec:
            raise ValueError(f"{where}: splits.{role} and {SPLIT_ROLES[role]} both given; give one")


def split_options(spec: dict) -> dict:
    """A task's options with ``splits`` turned into the families' ``split`` / ``train_split``."""
    out = {k: v for k, v in spec.items() if k != "splits"}
    for role, name in (spec.get("splits") or {}).items():
        out[SPLIT_ROLES[role]] = name
    return out


class ExtractParams(_Section):
    tasks: Optional[list[str]] = Field(None, description="subset of the source's tasks (default: all)")


class CompressParams(_Section):
    method: str = Field("tswitch", description="a method with a compact per-task form (a codec)")
    drop: float = Field(0.6, ge=0.0, lt=1.0)  # T-Switch's drop: [0, 1) (at 1 nothing could be pruned)
    encoding: Literal["auto", "bitmap", "ans"] = "auto"
    queries: int = Field(100, ge=1, description="Auto-Switch query samples per task (from the train split)")

    @field_validator("method")
    @classmethod
    def _codec(cls, name: str) -> str:
        try:
            method = methods.get(name)
        except MergeflowError as exc:
            raise ValueError(str(exc)) from None
        if method.codec is None:
            codecs = ", ".join(n for n in methods.names() if methods.get(n).codec is not None)
            raise ValueError(f"{name} has no compact per-task form (methods with one: {codecs})")
        return name


class MergeParams(_Section):
    """``methods`` lists what to run; a section named after a method sets its hyper-parameters."""

    model_config = ConfigDict(extra="allow")
    methods: list[str] = Field(default_factory=lambda: ["weight_average", "task_arithmetic", "tswitch"], min_length=1)

    @model_validator(mode="after")
    def _methods(self) -> "MergeParams":
        for i, name in enumerate(self.methods):
            try:
                methods.get(name)
            except MergeflowError as exc:
                raise ValueError(f"methods[{i}]: {exc}") from None
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        for name, options in (self.model_extra or {}).items():
            try:
                method = methods.get(name)
            except MergeflowError as exc:
                raise ValueError(f"{name}: not a method section ({exc})") from None
            if not isinstance(options, dict):
                raise ValueError(f"{name}: expected a mapping of hyper-parameters, got {options!r}")
            for key, source in method.set_by.items():
                if key in method.canonical(options):
                    raise ValueError(f"{name}.{key}: the pipeline takes it from {source}: set {source}")
            try:
                method.hyper(options, where=f"{name}.")
            except MergeflowError as exc:
                raise ValueError(str(exc)) from None
        return self

    def hyper(self, name: str) -> dict[str, Any]:
        """The hyper-parameters of ``name``: its defaults overlaid with this section's options."""
        return methods.get(name).hyper((self.model_extra or {}).get(name), where=f"merge.{name}.")


class EvaluateParams(_Section):
    batch_size: int = Field(512, ge=1)
    limit: Optional[int] = Field(None, ge=1, description="at most this many test samples per task")
    plots: bool = True


class GpuParams(_Section):
    pool: str = Field("gpu", min_length=1, description="the Prefect work pool whose workers sit on GPU machines")
    stages: list[Literal["merge", "evaluate"]] = Field(
        default_factory=list, description="stages run as deployments on that pool (empty: in the flow's process)"
    )
    transfer: Literal["shared", "dvc"] = Field(
        "shared",
        description="how a stage's inputs and outputs reach the worker: the workspace path on a shared "
        "filesystem, or the DVC remote run.dvc_remote",
    )
    workspace: str = Field(
        "~/.cache/mergeflow/worker",
        min_length=1,
        description="transfer dvc: the folder on the worker's machine holding its copies of workspaces",
    )


class RunParams(_Section):
    """How the pipeline runs (not what it computes: no stage's outputs depend on this section)."""

    task_runner: Literal["threads", "dask"] = "threads"
    workers: Optional[int] = Field(
        None, ge=1, description="threads or Dask workers (default: the machine's cores, at most 2 threads)"
    )
    dask_address: Optional[str] = Field(None, description="an existing Dask scheduler (default: a LocalCluster on 127.0.0.1)")
    gpu: GpuParams = Field(default_factory=GpuParams)
    tracking_uri: Optional[str] = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    prefect_api_url: Optional[str] = Field(
        None, description="Prefect server (default: $PREFECT_API_URL, else a temporary local one)"
    )
    dvc_remote: Optional[str] = Field(None, description="DVC remote to push the outputs to after a run (default: none)")
    lock: Literal["wait", "refuse"] = Field("wait", description="another run holds the workspace: wait for it, or refuse at once")
    lock_timeout: float = Field(3600.0, ge=0, description="seconds to wait for the workspace before giving up")

    @model_validator(mode="after")
    def _transfer(self) -> "RunParams":
        if self.gpu.transfer == "dvc" and self.gpu.stages and not self.dvc_remote:
            raise ValueError(
                "gpu.transfer: dvc moves the stages' artifacts through a DVC remote: set run.dvc_remote "
                "to a remote's name (dvc remote add NAME URL)"
            )
        return self


class Params(_Section):
    experiment: str = Field("mergeflow", min_length=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    download: DownloadParams = Field(default_factory=DownloadParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    compress: CompressParams = Field(default_factory=CompressParams)
    merge: MergeParams = Field(default_factory=MergeParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    run: RunParams = Field(default_factory=RunParams)

    def section(self, *keys: str) -> dict[str, Any]:
        """The named top-level keys as plain data (what a stage's fingerprint covers)."""
        data = self.model_dump(mode="json")
        return {k: data[k] for k in keys}

    def hyper(self, name: str) -> dict[str, Any]:
        """Method ``name``'s hyper-parameters in the pipeline: its ``merge`` section overlaid with
        those another stage's params set (``Method.set_by``, e.g. T-Switch's drop from compress)."""
        hp = self.merge.hyper(name)
        data = self.model_dump(mode="json")
        for key, path in methods.get(name).set_by.items():
            value: Any = data
            for part in path.split("."):
                value = value[part]
            hp[key] = value
        return hp

    def digest(self, *keys: str) -> str:
        return hashlib.sha256(json.dumps(self.section(*keys), sort_keys=True).encode()).hexdigest()


def parse_assignment(item: str) -> tuple[list[str], Any]:
    """``key.path=value`` (``--set``) -> (["key", "path"], the value parsed as YAML), or a one-line
    MergeflowError naming the assignment and what is wrong with it."""
    if not isinstance(item, str) or "=" not in item:
        raise MergeflowError(f"--set {item!r}: expected key.path=value")
    path, raw = item.split("=", 1)
    keys = [k.strip() for k in path.split(".")]
    if not path.strip():
        raise MergeflowError(f"--set {item!r}: empty key before '=' (expected key.path=value)")
    if not all(keys):
        raise MergeflowError(f"--set {item!r}: empty part in key {path.strip()!r} (expected key.path=value)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or "not valid YAML"
        raise MergeflowError(f"--set {path.strip()}: cannot parse value {raw!r} ({' '.join(str(why).split())})") from None
    return keys, value


def _set(data: dict[str, Any], assignment: str, source: str) -> None:
    keys, value = parse_assignment(assignment)
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MergeflowError(f"--set {'.'.join(keys)}: {key} is not a section in {source}")
    node[keys[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override (``key.path=value``) and validate params; a one-line error names the key."""
    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"params file not found: {path}")
    if path.is_dir():
        raise MergeflowError(f"{path}: is a folder, not a params file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MergeflowError(f"{path}:{where} not valid YAML") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeflowError(f"{path}: cannot read the params file ({' '.join(str(exc).split())[:160]})") from None
    if data is None:
        raise MergeflowError(f"{path}: empty params file (expected a mapping of sections; write {{}} for every default)")
    if not isinstance(data, dict):
        raise MergeflowError(f"{path}: expected a mapping of sections at the top level, got a {type(data).__name__}")
    for assignment in overrides:
        _set(data, assignment, str(path))
    return validate(data, str(path))


def validate(data: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg} (got {err['input']!r})"
        msg = " ".join(msg.split())
        if err["type"] == "value_error" and re.match(r"^[\w\[\]]+(\.[\w\[\]]+)*: ", msg):
            raise MergeflowError(f"{source}: {loc}.{msg}") from None  # a validator naming a key inside loc
        raise MergeflowError(f"{source}: {loc}: {msg}") from None
