"""Plots people compare: the score per task and model (a heatmap), every model's normalised
score ranked, storage against normalised accuracy, and Auto-Switch's routing accuracy beside
its accuracy per mode."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from mergeflow.io.atomic import atomic_file


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_all(metrics: Mapping, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    models = {"base": metrics["base"], "experts": metrics["experts"], **metrics["methods"]}
    tasks = list(metrics["experts"]["acc"])
    colors = plt.get_cmap("tab20").colors
    label = _metric_label(metrics)
    # per task and model: a heatmap reads for any number of models (grouped bars stop at ~10)
    grid = [[row["acc"][t] for t in tasks] + [row["acc_avg"]] for row in models.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(tasks) + 3.5), max(3, 0.32 * len(models) + 1.2)))
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "average"], rotation=30, ha="right")
    ax.set_yticks(range(len(models)), list(models))
    for i, vals in enumerate(grid):
        for j, v in enumerate(vals):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    ax.set_title(f"{label.capitalize()} per task and model")
    paths = [_save(fig, out_dir / "accuracy.png")]
    plt.close(fig)

    # every model's normalised score, best first
    ranked = sorted(models.items(), key=lambda kv: kv[1]["norm_acc_avg"])
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(ranked) + 1)))
    bars = ax.barh(
        range(len(ranked)),
        [row["norm_acc_avg"] for _, row in ranked],
        color=[
            "grey" if name == "base" else colors[0] if name == "experts" or row.get("dynamic") else colors[2]
            for name, row in ranked
        ],
    )
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(ranked)), [name for name, _ in ranked])
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("normalised score (method / expert), averaged over tasks")
    ax.set_title("Normalised score per model (blue: per-task or routed models, orange: one model)")
    paths.append(_save(fig, out_dir / "normalised.png"))
    plt.close(fig)

    routed = {name: row for name, row in metrics["methods"].items() if "routing_acc" in row}
    if routed:  # Auto-Switch: accuracy and routing accuracy per mode
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(routed) + 1.5), 3.5))
        xs = range(len(routed))
        for k, (key, label) in enumerate((("norm_acc_avg", "normalised accuracy"), ("routing_acc", "routing accuracy"))):
            vals = [row[key] for row in routed.values()]
            bars = ax.bar([x + (k - 0.5) * 0.38 for x in xs], vals, 0.38, label=label, color=colors[2 * k])
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(list(xs), [row.get("mode", name) for name, row in routed.items()])
        ax.set_ylim(0, 1.1)
        ax.set_title("Auto-Switch on shuffled mixed-task batches, per routing mode")
        ax.legend(fontsize=8, loc="upper left")
        paths.append(_save(fig, out_dir / "routing.png"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, row) in enumerate(models.items()):
        x = max(row["storage_ratio"], 1e-4)
        ax.scatter(x, row["norm_acc_avg"], s=36, color=colors[i % len(colors)], marker="os^D"[i // len(colors) % 4])
        ax.annotate(name, (x, row["norm_acc_avg"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("storage / float32 task vectors (log)")
    ax.set_ylabel("normalised score (method / expert)")
    ax.set_title("Storage against normalised accuracy")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "storage.png"))
    plt.close(fig)
    return paths


def _metric_label(metrics: Mapping) -> str:
    """The y label: "test accuracy", or the task metrics' names when they differ (GLUE, 1/perplexity)."""
    names = sorted(set((metrics.get("task_metrics") or {}).values())) or ["accuracy"]
    if names == ["accuracy"]:
        return "test accuracy"
    return "score: " + ", ".join("1/perplexity" if n == "perplexity" else n for n in names)
