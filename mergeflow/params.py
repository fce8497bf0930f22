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


class DownloadParams(_Section):
    source: str = Field("zoo://digits", description="zoo://digits, or a local directory with base/ and expert checkpoints")
    zoo: dict[str, Any] = Field(default_factory=dict, description="overrides of the zoo's ZooSpec fields")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.startswith("zoo://"):
            raise ValueError(f"unsupported source {v!r} (this version builds zoo:// sources)")
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


class ExtractParams(_Section):
    tasks: Optional[list[str]] = Field(None, description="subset of the source's tasks (default: all)")


class CompressParams(_Section):
    method: Literal["tswitch"] = "tswitch"
    drop: float = Field(0.6, ge=0.0, le=1.0)
    encoding: Literal["auto", "bitmap", "ans"] = "auto"
    queries: int = Field(100, ge=1, description="Auto-Switch query samples per task (from the train split)")


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
            if name in ("tswitch", "autoswitch") and "drop" in options:
                raise ValueError(f"{name}.drop: the pipeline's switches come from the compress stage: set compress.drop")
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


class Params(_Section):
    experiment: str = Field("mergeflow", min_length=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    download: DownloadParams = Field(default_factory=DownloadParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    compress: CompressParams = Field(default_factory=CompressParams)
    merge: MergeParams = Field(default_factory=MergeParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)

    def section(self, *keys: str) -> dict[str, Any]:
        """The named top-level keys as plain data (what a stage's fingerprint covers)."""
        data = self.model_dump(mode="json")
        return {k: data[k] for k in keys}

    def digest(self, *keys: str) -> str:
        return hashlib.sha256(json.dumps(self.section(*keys), sort_keys=True).encode()).hexdigest()


def _set(data: dict[str, Any], assignment: str, source: str) -> None:
    if "=" not in assignment:
        raise MergeflowError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MergeflowError(f"--set {path}: {key} is not a section in {source}")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise MergeflowError(f"--set {path}: cannot parse value {raw!r}") from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override (``key.path=value``) and validate params; a one-line error names the key."""
    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MergeflowError(f"{path}:{where} not valid YAML") from None
    if not isinstance(data, dict):
        raise MergeflowError(f"{path}: expected a mapping of sections at the top level")
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
