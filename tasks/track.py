"""MLflow: one experiment per ``experiment`` param, a parent run per pipeline run, a nested run
per method; params, every metric, the plots and tables, tags leading back to git and dvc.lock."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from mergeflow.params import Params

warnings.filterwarnings("ignore", category=DeprecationWarning, module="sqlalchemy")
warnings.filterwarnings("ignore", message=".*SQLAlchemy.*")


def tracking_uri(root: Path, p: Params | None = None) -> str:
    """params ``run.tracking_uri``, else $MLFLOW_TRACKING_URI, else the workspace's sqlite:///mlflow.db."""
    if p is not None and p.run.tracking_uri:
        return p.run.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def experiment_id(mlflow, name: str, root: Path) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = os.environ.get("MLFLOW_ARTIFACT_LOCATION") or (root / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def source_tags(sources: dict) -> dict[str, str]:
    """``source.<name>[.dataset]`` -> the pinned ref (hub commit) or the local path and its sha256."""

    def pin(entry) -> str | None:
        if not isinstance(entry, dict):  # the zoo's manifest has no pins
            return None
        return entry.get("pinned_ref") or f"{entry.get('path')} sha256:{entry.get('sha256', '')[:16]}"

    tags = {"mergeflow.family": sources.get("family", "zoo")}
    if sources.get("base"):
        tags["source.base"] = pin(sources["base"])
    listed = sources.get("refs")
    refs_of = listed if isinstance(listed, dict) else {}
    for task, refs in refs_of.items():
        tags[f"source.{task}"] = pin(refs.get("model"))
        if refs.get("dataset"):
            tags[f"source.{task}.dataset"] = pin(refs["dataset"])
    return {k: v for k, v in tags.items() if v}


def _metrics(row: dict, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}acc.{t}": a for t, a in row["acc"].items()}
    out |= {f"{prefix}norm_acc.{t}": a for t, a in row["norm_acc"].items()}
    out |= {f"{prefix}{k}": float(row[k]) for k in ("acc_avg", "norm_acc_avg", "storage_bytes", "storage_ratio")}
    for key, per_task in row.items():  # a family's extra figures per task (f1, perplexity, ...)
        if key not in ("acc", "norm_acc") and isinstance(per_task, dict):
            out |= {f"{prefix}{key}.{t}": float(v) for t, v in per_task.items() if isinstance(v, (int, float))}
    return out


@task(name="mlflow-log", cache_policy=None, retries=2, retry_delay_seconds=2)
def log_run(p: Params, root: Path, metrics: dict, stage_runs: list[dict], tags: dict[str, str | None]) -> str:
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: put back what was there before, so a
    # later run in this process (another workspace) logs to its own database, not this one's
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _log_run(p, root, metrics, stage_runs, tags)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _log_run(p: Params, root: Path, metrics: dict, stage_runs: list[dict], tags: dict[str, str | None]) -> str:
    import mlflow

    log = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri(root, p))
    exp = experiment_id(mlflow, p.experiment, root)
    params = p.model_dump(mode="json")
    cached = [r["stage"] for r in stage_runs if r["cached"]]
    run_tags = {k: v for k, v in tags.items() if v} | {"mergeflow.cached_stages": ",".join(cached) or "none"}
    with mlflow.start_run(experiment_id=exp, run_name=f"pipeline-{p.experiment}", tags=run_tags) as parent:
        mlflow.log_params({k: str(v) for k, v in flatten({k: v for k, v in params.items() if k != "merge"}).items()})
        mlflow.log_param("merge.methods", ",".join(p.merge.methods))
        mlflow.log_metrics(_metrics(metrics["base"], "base.") | _metrics(metrics["experts"], "experts."))
        mlflow.log_metrics({f"switches.{k}": float(v) for k, v in metrics.get("switches", {}).items()})
        mlflow.log_metrics({f"stage_seconds.{r['stage']}": r["seconds"] for r in stage_runs})
        for name, row in metrics["methods"].items():
            with mlflow.start_run(experiment_id=exp, run_name=name, nested=True, tags=run_tags | {"mergeflow.method": name}):
                method = row.get("method", name)  # Auto-Switch reports one row per routing mode
                hp = p.hyper(method)
                mlflow.log_params({"method": method, **hp, **({"mode": row["mode"]} if "mode" in row else {})})
                mlflow.log_metrics(_metrics(row) | ({"routing_acc": float(row["routing_acc"])} if "routing_acc" in row else {}))
        eval_dir = root / "artifacts" / "eval"
        mlflow.log_artifacts(str(eval_dir), artifact_path="eval")
        if (root / "params.yaml").exists():
            mlflow.log_artifact(str(root / "params.yaml"))
        if (root / "dvc.lock").exists():
            mlflow.log_artifact(str(root / "dvc.lock"))
        sources = root / "artifacts" / "sources.json"
        if sources.exists():  # the commit every hub ref resolved to: a dashboard row leads back to them
            mlflow.log_artifact(str(sources))
            mlflow.set_tags(source_tags(json.loads(sources.read_text())))
    log.info("mlflow: run %s in experiment %r (%s)", parent.info.run_id, p.experiment, tracking_uri(root, p))
    return parent.info.run_id
