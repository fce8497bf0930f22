"""The full ``mergeflow`` command: the library's commands plus the orchestrated ``run``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from mergeflow.cli import SetOpt, app, fail, guarded
from mergeflow.errors import MergeflowError


def save_overrides(path: Path, sets: list[str]) -> None:
    """Write ``--set`` overrides into the params file, comments kept (as ``dvc exp run -S`` does),
    so that dvc.lock, the MLflow run and the next ``dvc repro`` all see the params that ran."""
    from ruamel.yaml import YAML

    import io

    from mergeflow.io.atomic import atomic_file
    from mergeflow.params import parse_assignment

    yaml = YAML()
    yaml.preserve_quotes = True
    data = yaml.load(path.read_text()) or {}
    for item in sets:
        keys, value = parse_assignment(item)
        node = data
        for k in keys[:-1]:
            if k not in node:
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    buf = io.StringIO()
    yaml.dump(data, buf)
    with atomic_file(path, user_file=True) as tmp:  # the user's params file, edited as asked (as dvc exp run -S)
        tmp.write_text(buf.getvalue())


def print_table(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from mergeflow.metrics import table

    names = sorted(set((metrics.get("task_metrics") or {}).values())) or ["accuracy"]
    what = ", ".join("1/perplexity" if n == "perplexity" else n for n in names)
    t = Table(title=f"mergeflow results ({what} on held-out test splits)")
    rows = table(metrics)
    routed = any(r[5] is not None for r in rows)
    for col in (
        "model",
        "acc avg" if names == ["accuracy"] else "score avg",
        "normalised",
        "storage bytes",
        "/ fp32 task vectors",
    ) + (("routing acc",) if routed else ()):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, acc, norm, storage, ratio, routing in rows:
        cells = [name, f"{acc:.4f}", f"{norm:.4f}", f"{storage:,}", f"{ratio:.4f}"]
        t.add_row(*cells, *(() if not routed else ("" if routing is None else f"{routing:.4f}",)))
    console = Console()
    if not console.is_terminal:  # a log or a pipe: don't squeeze the table into 80 columns
        console = Console(width=120)
    console.print(t)
    if "switches" in metrics:
        s = metrics["switches"]
        console.print(
            f"T-Switch at drop {s['drop']}: {s['bits_per_param']:.3f} bits/param "
            f"(entropy floor {s['entropy_floor_bits']:.3f}, keep fraction {s['keep_fraction']:.3f})"
        )


@app.command("run")
def run_cmd(
    params: Annotated[Path, typer.Option(help="params file")] = Path("params.yaml"),
    set_: SetOpt = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="skip MLflow logging")] = False,
) -> None:
    """Run the whole pipeline as a Prefect flow (cached by inputs), then DVC commit and MLflow log."""
    from mergeflow.params import load_params

    t0 = time.perf_counter()
    from mergeflow.stages import preflight

    from tasks import workspace

    p = guarded(lambda: load_params(params, set_ or ()))  # every key checked before any work
    guarded(lambda: workspace.check_sections(params))  # every section DVC tracks is there
    refreshed = guarded(lambda: workspace.refresh(p, params.resolve().parent))  # an init-ed workspace's dvc.yaml
    if refreshed:
        typer.echo(f"updated {', '.join(refreshed)} (the sources params name, the installed mergeflow's code)")
    guarded(lambda: preflight(p, params.resolve().parent))  # and every output's place
    if set_:
        save_overrides(params, set_)
    if p.run.prefect_api_url:  # a team's Prefect server (else $PREFECT_API_URL, else a temporary local one)
        import os

        os.environ["PREFECT_API_URL"] = p.run.prefect_api_url
    from flows.pipeline import run_pipeline

    try:
        result = run_pipeline(p, str(params.resolve().parent), track=not no_track)
    except MergeflowError as exc:
        fail(str(exc))
    print_table(result["metrics"])
    cached = [r["stage"] for r in result["stages"] if r["cached"]]
    typer.echo(f"stages cached: {', '.join(cached) or 'none'}; total {time.perf_counter() - t0:.1f} s")


@app.command("init")
def init_cmd(folder: Annotated[Path, typer.Argument(help="the new workspace (made if missing)")]) -> None:
    """Scaffold a workspace of your own: git, DVC, a params.yaml with commented sources, the
    dvc.yaml for it (kept current by `mergeflow run`), mergeflow-code.yaml and .gitignore."""
    from tasks import workspace

    wrote = guarded(lambda: workspace.init(folder))
    typer.echo(
        f"made {folder}: {', '.join(wrote)}; next: edit {folder / 'params.yaml'}, then `mergeflow run --params {folder / 'params.yaml'}`"
    )


CronOpt = Annotated[Optional[str], typer.Option("--cron", help='cron schedule, e.g. "0 2 * * *" (every day at 02:00)')]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="deployment name (default: the params' experiment)")]
TzOpt = Annotated[Optional[str], typer.Option("--timezone", help="IANA time zone of the cron schedule (default: UTC)")]


@app.command("deploy")
def deploy_cmd(
    params: Annotated[Path, typer.Option(help="params file (its folder is the workspace)")] = Path("params.yaml"),
    cron: CronOpt = None,
    name: NameOpt = None,
    pool: Annotated[
        str, typer.Option(help="work pool whose workers run the pipeline (created as a process pool if missing)")
    ] = "mergeflow",
    timezone: TzOpt = None,
) -> None:
    """Register the pipeline as a Prefect deployment (mergeflow-run/NAME, on --cron) and the stage
    deployment for run.gpu.pool, on the server at run.prefect_api_url or $PREFECT_API_URL."""
    from flows.deploy import deploy

    names = guarded(lambda: deploy(params, cron=cron, name=name, pool=pool, timezone=timezone))
    typer.echo(
        f"deployed {names[0]} on pool {pool!r}"
        + (f", schedule {cron!r}" if cron else ", no schedule")
        + f"; {names[1]} for run.gpu.stages"
    )
    typer.echo(f"run it now: prefect deployment run '{names[0]}'; workers: prefect worker start --pool {pool}")


@app.command("serve")
def serve_cmd(
    params: Annotated[Path, typer.Option(help="params file (its folder is the workspace)")] = Path("params.yaml"),
    cron: CronOpt = None,
    name: NameOpt = None,
    timezone: TzOpt = None,
) -> None:
    """Serve the pipeline deployment (mergeflow-run/NAME, on --cron) from this process until Ctrl-C."""
    from flows.deploy import serve

    guarded(lambda: serve(params, cron=cron, name=name, timezone=timezone))


# Commands that only run library work: once they return, their output is complete (merges
# are fsynced and renamed into place) and nothing is registered to run at exit, so the process
# ends at once. Interpreter teardown after torch and numba costs 0.5-0.9 s (measured on
# 2 cores), a quarter of a small merge.
_QUICK_EXIT = ("merge", "methods")


def main() -> None:
    import sys

    from mergeflow.cli import run_app

    code: str | int | None
    try:
        code = run_app(app)
    except SystemExit as exc:
        code = exc.code
    if len(sys.argv) > 1 and sys.argv[1] in _QUICK_EXIT and (code is None or isinstance(code, int)):
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
