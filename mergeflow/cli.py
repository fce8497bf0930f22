"""The ``mergeflow`` command's library half: merge, compress, switch apply, methods, stage.

``flows.cli`` adds the orchestrated ``run`` on top (the library never imports Prefect).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from mergeflow.errors import MergeflowError, MergeflowWarning
from mergeflow.io.atomic import CHECKPOINT

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Model merging with binary task switches.")
switch_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Binary task switches.")
app.add_typer(switch_app, name="switch")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="key=value (repeatable)")]


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"mergeflow: error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a MergeflowError becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except MergeflowError as exc:
        fail(str(exc))


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` options of the library commands (one level: hyper-parameter names)."""
    from mergeflow.params import parse_assignment

    out = {}
    for item in sets or []:
        keys, value = parse_assignment(item)
        out[".".join(keys)] = value
    return out


def warn(msg: str) -> None:
    """A one-line warning on stderr (the work goes on)."""
    typer.echo(f"mergeflow: warning: {' '.join(str(msg).split())}", err=True)


def check_models(base: Path, models: list[Path], names: list[str]) -> None:
    """Warn (one line each) about a model given twice and a model that is the base's own file."""
    import os

    real_base = os.path.realpath(base)
    seen: dict[str, int] = {}
    for i, (path, name) in enumerate(zip(models, names)):
        real = os.path.realpath(path)
        if real == real_base:
            warn(f"{name}: is the base itself (its task vector is zero); merged as given")
        elif real in seen:
            warn(f"{name}: given twice (models {seen[real]} and {i}); merged as given, as two tasks")
        seen.setdefault(real, i)


def warn_unchanged(sources, names: list[str]) -> None:
    """After a merge: warn about each fine-tune the engine found identical to the base."""
    for src, name in zip(sources, names):
        if not src.changed:
            warn(f"{name}: identical to the base (its task vector is zero); it adds nothing to the merge")


def progress_bar(description: str):
    """A rich progress bar on stderr, returned as (context manager, callback(i, n, name))."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # on a terminal only (a log or a pipe gets the command's one result line, or its one error line)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[name]}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task(description, total=None, name="")

    def update(i: int, n: int, name: str) -> None:
        bar.update(task, completed=i, total=n, name=name[-40:])

    return bar, update


@app.command("merge")
def merge_cmd(
    models: Annotated[list[str], typer.Argument(help="fine-tuned checkpoints (dirs, .safetensors files or hf://org/name[@rev])")],
    method: Annotated[str, typer.Option(help="a method from `mergeflow methods`")],
    base: Annotated[str, typer.Option(help="the pretrained checkpoint")],
    out: Annotated[Path, typer.Option(help="output directory")],
    set_: SetOpt = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    family: Annotated[
        str,
        typer.Option(help="auto: map names through config.json's architectures (prefixes, heads); none: names as stored"),
    ] = "auto",
) -> None:
    """Merge fine-tuned MODELs onto the base with one method.

    Raw Hugging Face fine-tunes are fine: each model's names are mapped onto the base's body
    (``bert.`` / ``roberta.`` prefixes, legacy buffers), and classification heads are never
    merged: each is written to OUT/heads/<model>.safetensors with its config (label maps)."""

    def go():
        from mergeflow import methods
        from mergeflow.io.checkpoint import DTYPES, Checkpoint
        from mergeflow.io.sources import resolve_ref
        from mergeflow.merge import TaskVectors, merge_to_disk, resolve_device

        from mergeflow.io.outputs import claim

        m = methods.get(method)
        sets = parse_sets(set_)
        store = sets.pop("store", "checkpoints")
        out_dtype = sets.pop("out_dtype", None)
        if out_dtype is not None and out_dtype not in DTYPES:
            raise MergeflowError(f"--set out_dtype={out_dtype}: not one of {', '.join(DTYPES)}")
        compact = [n for n in methods.names() if methods.get(n).compact is not None]
        if store not in ("checkpoints", "switches") or (store == "switches" and m.compact is None):
            raise MergeflowError(f"--set store={store}: only {', '.join(compact)} has a compact switch store")
        hp = m.hyper(sets, where="--set ")
        dev = resolve_device(device)
        base_path, model_paths = resolve_ref(base), [resolve_ref(r) for r in models]
        claim(out, is_dir=True, kind=CHECKPOINT, inputs=[base_path, *model_paths])
        check_models(base_path, model_paths, models)
        from mergeflow.io import body

        base_ckpt, model_cks = Checkpoint(base_path), [Checkpoint(p) for p in model_paths]
        al = body.align(base_ckpt, model_cks, models, family)
        base_in, model_in = (al.base, al.models) if al.needs_view else (base_ckpt, model_cks)
        sources = [TaskVectors.from_model(base_in, ck) for ck in model_in]
        labels = body.head_labels(models)
        heads: list[str] = []

        def extra(folder: Path) -> None:
            heads.extend(body.write_heads(folder, al, model_cks, labels))

        if store == "switches":
            m.compact(base_in, sources, hp, out, typer.echo)
            typer.echo(f"wrote {out}")
            return
        from mergeflow._alloc import reuse_freed_memory

        reuse_freed_memory()
        bar, update = progress_bar(f"{method}")
        with bar:
            merge_to_disk(
                m,
                base_in,
                sources,
                hp,
                out,
                dev,
                dtype=DTYPES[out_dtype] if out_dtype else None,
                progress=update,
                metadata={"base": base},
                extra=extra,
            )
        warn_unchanged(sources, models)
        if al.kept:
            warn(f"{len(al.kept)} base tensors no model has (e.g. {al.kept[0]}) are kept from the base, not merged")
        typer.echo(f"wrote {out}" + (f" (heads, not merged: {out / 'heads'}/{{{','.join(heads)}}}.safetensors)" if heads else ""))

    guarded(go)


@app.command("compress")
def compress_cmd(
    base: Annotated[str, typer.Option(help="the pretrained checkpoint")],
    model: Annotated[str, typer.Option(help="the fine-tuned checkpoint")],
    out: Annotated[Path, typer.Option(help="output switch file (.safetensors)")],
    set_: SetOpt = None,
) -> None:
    """Write one task's binary switch (T-Switch) with its bits per parameter."""

    def go():
        from mergeflow import methods
        from mergeflow.codecs.switch import FORMAT_NAME, save_switch
        from mergeflow.io.checkpoint import Checkpoint
        from mergeflow.io.outputs import claim
        from mergeflow.io.sources import resolve_ref
        from mergeflow.methods import tswitch
        from mergeflow.vectors import iter_task_vector

        sets = parse_sets(set_)
        encoding = sets.pop("encoding", "auto")
        if encoding not in ("auto", "bitmap", "ans"):
            raise MergeflowError(f"--set encoding={encoding}: not one of auto, bitmap, ans")
        hp = methods.get(tswitch.NAME).hyper(sets, where="--set ")
        base_path, model_path = resolve_ref(base), resolve_ref(model)
        claim(out, is_dir=False, kind=FORMAT_NAME, inputs=[base_path, model_path])
        check_models(base_path, [model_path], [model])
        base_ckpt, model_ckpt = Checkpoint(base_path), Checkpoint(model_path)
        sw = tswitch.compress(iter_task_vector(base_ckpt, model_ckpt), hp["drop"], metadata={"base": base, "model": model})
        st = save_switch(out, sw, encoding=encoding)
        n = st.n_params + sum(t.numel() for t in sw.dense.values())
        typer.echo(
            f"wrote {out}: {st.bits_per_param:.3f} bits/param (entropy floor {st.entropy_floor_bits:.3f}), "
            f"{st.file_bytes:,} bytes = {st.file_bytes / (4 * max(n, 1)):.4f} of the float32 task vector"
        )

    guarded(go)


@switch_app.command("apply")
def switch_apply_cmd(
    base: Annotated[str, typer.Option(help="the pretrained checkpoint")],
    switch: Annotated[Path, typer.Option(help="a switch file from `mergeflow compress`")],
    out: Annotated[Path, typer.Option(help="output checkpoint directory")],
) -> None:
    """Rebuild a task model theta_0 + s * B from the base and one switch."""

    def go():
        from mergeflow.codecs.switch import load_switch
        from mergeflow.io.checkpoint import Checkpoint, write_checkpoint
        from mergeflow.io.sources import resolve_ref
        from mergeflow.methods.tswitch import apply_switch

        from mergeflow.io.outputs import claim

        base_path = resolve_ref(base)
        claim(out, is_dir=True, kind=CHECKPOINT, inputs=[base_path, switch])
        base_ckpt = Checkpoint(base_path)
        write_checkpoint(out, apply_switch(base_ckpt, load_switch(switch), source=str(switch)), like=base_ckpt)
        typer.echo(f"wrote {out}")

    guarded(go)


@app.command("methods")
def methods_cmd() -> None:
    """List the merging methods with their hyper-parameters and references."""
    from mergeflow import methods

    for name in methods.names():
        m = methods.get(name)
        needs = f", needs {m.needs.replace('_', '-')} of task exemplars (pipeline only)" if m.needs else ""
        flags = "".join(f", {flag}" for flag, on in (("transductive", m.transductive), ("trains", m.trains)) if on)
        typer.echo(f"{name}  [{m.kind}{needs}{flags}]  {m.summary}")
        if m.reference:
            typer.echo(f"    reference: {m.reference}")
        for key, p in m.params.items():
            rng = (
                f" in [{p.low}, {p.high}{')' if p.high_open else ']'}"
                if p.low is not None and p.high is not None
                else f" >= {p.low}"
                if p.low is not None
                else f" <= {p.high}"
                if p.high is not None
                else ""
            )
            also = f" (also {', '.join(p.aliases)})" if p.aliases else ""
            source = f" (pipeline: {m.set_by[key]})" if key in m.set_by else ""
            typer.echo(f"    {key}{also} = {p.default!r}{rng}: {p.help}{source}")


@app.command("export")
def export_cmd(
    method: Annotated[str, typer.Option(help="a method the workspace merged (merge.methods), or experts")],
    task: Annotated[str, typer.Option(help="one of the workspace's tasks")],
    out: Annotated[Path, typer.Option(help="output folder (a Hugging Face model folder)")],
    params: Annotated[Path, typer.Option(help="params file (its folder is the workspace)")] = Path("params.yaml"),
) -> None:
    """Write TASK's deployable model from the workspace's merge with METHOD: body and the task's own
    head, config with its label maps, the tokenizer (see mergeflow/export.py)."""

    def go():
        from mergeflow.export import export
        from mergeflow.io.outputs import claim
        from mergeflow.params import load_params

        p = load_params(params)
        root = params.resolve().parent
        claim(out, is_dir=True, kind=CHECKPOINT, inputs=[root / "artifacts", params.resolve()])
        res = export(p, root, method, task, out)
        typer.echo(f"wrote {out}: task {task} by {method} ({res['family']}: {', '.join(res['files'])})")

    guarded(go)


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help="download, extract, compress, merge or evaluate")],
    params: Annotated[Path, typer.Option(help="params file")] = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage in the current directory (what dvc.yaml calls)."""

    def go():
        from mergeflow import stages
        from mergeflow.io.lock import workspace_lock
        from mergeflow.params import load_params

        if name not in stages.STAGES:
            raise MergeflowError(f"unknown stage {name!r} (stages: {', '.join(stages.STAGES)})")
        p = load_params(params, set_ or ())
        stages.preflight(p, Path.cwd(), [name])  # before the lock and any work
        say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
        with workspace_lock(Path.cwd(), p.run.lock, p.run.lock_timeout, say):  # not beside a running `mergeflow run`
            stages.run(name, p, Path.cwd(), log=say)

    guarded(go)


def run_app(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the command line; every failure is one line on stderr and a non-zero status.

    Usage errors (a missing argument, an unknown option) are printed as one line instead of
    click's framed box; warnings of the libraries underneath are not shown (an expected failure
    must read as its one line), mergeflow's own warnings are, one line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MergeflowWarning):
            warn(str(message))

    warnings.showwarning = show
    warnings.simplefilter("default", MergeflowWarning)
    try:
        result = application(args=argv, standalone_mode=False, prog_name="mergeflow")
    except typer.Abort:
        typer.echo("mergeflow: error: aborted", err=True)
        return 130
    except typer.TyperException as exc:  # click's exceptions (typer carries its own copy of click)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 0
        message = " ".join(exc.format_message().split())
        if ctx is None:
            typer.echo(f"mergeflow: error: {message}", err=True)
            return getattr(exc, "exit_code", 2) or 2
        command = ctx.command_path.removeprefix("mergeflow").strip()
        where = f"{command}: " if command else ""
        typer.echo(f"mergeflow: error: {where}{message.rstrip('.')} (see {ctx.command_path} --help)", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("mergeflow: error: interrupted", err=True)
        return 130
    except MergeflowError as exc:  # raised outside a command's guard (e.g. by a callback)
        typer.echo(f"mergeflow: error: {' '.join(str(exc).split())}", err=True)
        return 2
    except OSError as exc:  # disk full, permission denied, ...: the file and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"mergeflow: error: {where}{exc.strerror or ' '.join(str(exc).split())}", err=True)
        return 2
    except Exception as exc:  # a bug: one line, the traceback on request
        import os

        if os.environ.get("MERGEFLOW_DEBUG"):
            raise
        typer.echo(
            f"mergeflow: error: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            f"set MERGEFLOW_DEBUG=1 for the traceback",
            err=True,
        )
        return 1
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
