"""GLUE metrics for the text-classification family: which metric a task is scored with, and
scoring predictions with it (``{"score", "metric", components...}``).

The metrics are the ones DARE, EMR-Merging and T-Switch report for RoBERTa on GLUE (see
docs/family-text.md). scikit-learn and SciPy are imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import TaskSources

# GLUE task -> (text columns, metric). Keys are normalised names (see glue_name).
GLUE: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("sentence",), "matthews_correlation"),
    "sst2": (("sentence",), "accuracy"),
    "mrpc": (("sentence1", "sentence2"), "accuracy_f1"),
    "stsb": (("sentence1", "sentence2"), "pearson_spearmanr"),
    "qqp": (("question1", "question2"), "accuracy_f1"),
    "mnli": (("premise", "hypothesis"), "accuracy"),
    "mnli_matched": (("premise", "hypothesis"), "accuracy"),
    "mnli_mismatched": (("premise", "hypothesis"), "accuracy"),
    "qnli": (("question", "sentence"), "accuracy"),
    "rte": (("sentence1", "sentence2"), "accuracy"),
    "wnli": (("sentence1", "sentence2"), "accuracy"),
    "ax": (("premise", "hypothesis"), "accuracy"),
}
CLASSIFICATION_METRICS = ("accuracy", "f1", "accuracy_f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearmanr", "pearson_spearmanr")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def glue_name(name: str | None) -> str | None:
    """``"glue-STS-B"`` -> ``"stsb"``: lower case, without a ``glue-`` prefix or dashes."""
    if not name:
        return None
    n = name.lower()
    for p in ("glue-", "glue_", "glue/"):
        n = n.removeprefix(p)
    return n.replace("-", "")


def glue_defaults(ts: TaskSources) -> tuple[tuple[str, ...], str] | None:
    for n in (glue_name(ts.options.get("subset")), glue_name(ts.name)):
        if n in GLUE:
            return GLUE[n]
    return None


def task_metric(ts: TaskSources, regression: bool) -> str:
    metric = ts.options.get("metric")
    where = f"download.tasks.{ts.name}.metric"
    if metric is None:
        glue = glue_defaults(ts)
        if glue is not None and (glue[1] in REGRESSION_METRICS) == regression:
            return glue[1]
        return "pearson_spearmanr" if regression else "accuracy"
    if metric not in METRICS:
        raise MergeflowError(f"{where}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if regression and metric not in REGRESSION_METRICS:
        raise MergeflowError(f"{where}: {metric} needs class labels, the fine-tune has a regression head (num_labels 1)")
    if not regression and metric not in CLASSIFICATION_METRICS:
        raise MergeflowError(f"{where}: {metric} is for a regression head, the fine-tune has a classification head")
    return metric


def glue_score(metric: str, outputs, labels) -> dict[str, Any]:
    """``{"score", "metric", components...}`` of predictions (class ids, or values for regression)
    against labels. Classification metrics also report ``accuracy``. F1 is the positive class's
    (binary labels) or the macro average (more classes)."""
    import numpy as np

    p = np.asarray(outputs.cpu().numpy() if isinstance(outputs, torch.Tensor) else outputs)
    y = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if len(y) == 0:
        raise MergeflowError(f"{metric}: no rows to score")
    if p.shape[0] != y.shape[0]:
        raise MergeflowError(f"{metric}: {p.shape[0]} outputs for {y.shape[0]} labels")
    if metric in REGRESSION_METRICS:
        from scipy.stats import pearsonr, spearmanr

        p, y = p.astype(np.float64).reshape(-1), y.astype(np.float64).reshape(-1)
        parts = {}
        constant = len(y) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0  # correlation undefined: 0
        if metric in ("pearson", "pearson_spearmanr"):
            parts["pearson"] = 0.0 if constant else _finite(pearsonr(p, y)[0])
        if metric in ("spearmanr", "pearson_spearmanr"):
            parts["spearmanr"] = 0.0 if constant else _finite(spearmanr(p, y)[0])
    elif metric in CLASSIFICATION_METRICS:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        p, y = p.astype(np.int64).reshape(-1), y.astype(np.int64).reshape(-1)
        parts = {"accuracy": float(accuracy_score(y, p))}
        if metric in ("f1", "accuracy_f1"):
            binary = set(np.unique(np.concatenate([y, p])).tolist()) <= {0, 1}
            parts["f1"] = float(f1_score(y, p, average="binary" if binary else "macro", zero_division=0))
        if metric == "matthews_correlation":
            parts["matthews_correlation"] = float(matthews_corrcoef(y, p))
    else:
        raise MergeflowError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if metric == "accuracy_f1":
        score = (parts["accuracy"] + parts["f1"]) / 2
    elif metric == "pearson_spearmanr":
        score = (parts["pearson"] + parts["spearmanr"]) / 2
    else:
        score = parts[metric]
    return {"score": float(score), "metric": metric, **parts}


def _finite(x) -> float:
    x = float(x)
    return x if x == x else 0.0
