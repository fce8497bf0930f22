"""Score bookkeeping: normalised scores, storage accounting, metrics.json and per_task.csv.

metrics.json (a contract)::

    {"methods": {"<name>": {"acc": {"<task>": float}, "acc_avg": float, "norm_acc_avg": float,
                            "storage_bytes": int, "storage_ratio": float}},
     "experts": {...same shape...}, "base": {...same shape...}}

``acc`` holds each task's score under its family's metric (``task_metrics`` names it per
task); ``norm_acc_avg`` averages acc_method/acc_expert over tasks; ``storage_bytes`` counts
what a method keeps besides the shared base and the per-task heads; ``storage_ratio`` divides
it by the bytes of the float32 task vectors of all tasks. Each key in full: docs/metrics.md.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping

from mergeflow.io.atomic import write_json, write_text


def entry(score: Mapping[str, float], expert_score: Mapping[str, float], storage_bytes: int, tv_bytes: int, **extra) -> dict:
    """One metrics.json row: per-task score (kept under the contract's key ``acc``: accuracy, a
    GLUE metric or 1/perplexity), its average, normalised average and storage."""
    tasks = list(expert_score)
    norm = [score[t] / expert_score[t] if expert_score[t] > 0 else 0.0 for t in tasks]
    return {
        "acc": {t: float(score[t]) for t in tasks},
        "acc_avg": sum(score[t] for t in tasks) / len(tasks),
        "norm_acc_avg": sum(norm) / len(norm),
        "norm_acc": {t: n for t, n in zip(tasks, norm)},
        "storage_bytes": int(storage_bytes),
        "storage_ratio": storage_bytes / tv_bytes if tv_bytes else 0.0,
        **extra,
    }


def per_task_rows(metrics: Mapping) -> list[dict]:
    """Long-format rows (model, task, acc, norm_acc) for per_task.csv and DVC plots."""
    rows = []
    models = {"base": metrics["base"], "experts": metrics["experts"], **metrics["methods"]}
    for model, row in models.items():
        for task, acc in row["acc"].items():
            rows.append({"model": model, "task": task, "acc": round(acc, 6), "norm_acc": round(row["norm_acc"][task], 6)})
    return rows


def write_metrics(metrics: Mapping, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    buf = io.StringIO()
    rows = per_task_rows(metrics)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "per_task.csv", buf.getvalue())
    return out_dir / "metrics.json", out_dir / "per_task.csv"


def table(metrics: Mapping) -> list[tuple[str, float, float, int, float, float | None]]:
    """(name, acc_avg, norm_acc_avg, storage_bytes, storage_ratio, routing_acc or None) for base,
    experts and each method (routing accuracy: Auto-Switch's rows)."""
    models = {"base": metrics["base"], "experts": metrics["experts"], **metrics["methods"]}
    return [
        (n, r["acc_avg"], r["norm_acc_avg"], r["storage_bytes"], r["storage_ratio"], r.get("routing_acc"))
        for n, r in models.items()
    ]
