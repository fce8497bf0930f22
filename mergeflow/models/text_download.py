"""The text-classification family's download stage: the encoder body of the base and of every
fine-tune into ``checkpoints/`` (float32, one set of names), each fine-tune's head into
``heads/<task>.safetensors``, the tokenised splits into ``data/`` (see docs/family-text.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import Sources, TaskSources
from mergeflow.models.text_build import body_config, load_config, meta_model, position_limit, split_names
from mergeflow.models.text_data import check_texts, load_tokenizer, prepare_texts
from mergeflow.models.text_metrics import task_metric


def prepare(sources: Sources, out: Path, log, family: str) -> dict:
    """``TextClassification.prepare`` (``family`` its name, for messages): write ``out/checkpoints``,
    ``out/heads`` and ``out/data``; the facts for sources.json."""
    from mergeflow.io.checkpoint import Checkpoint

    max_length, pool = family_options(sources.options)
    base_dir = Path(sources.base.path)
    base_cfg = load_config(base_dir)
    body_cfg = body_config(base_cfg)
    body_model = meta_model(body_cfg, base_dir / "config.json")
    body_shapes, _ = split_names(body_model)
    prefix = body_model.base_model_prefix + "."
    limit = position_limit(body_cfg)
    if limit is not None and max_length > limit:
        raise MergeflowError(
            f"download.options.max_length: {max_length} is more than the {limit} positions of {base_dir / 'config.json'}"
        )
    with Checkpoint(base_dir) as base_ck:
        base = body_tensors(base_ck, body_shapes, None)
        dropped = [n for n in base_ck.names() if n not in base and prefix + n not in base]
    model_dirs = {task: model_dir(ts) for task, ts in sources.tasks.items()}
    checked = check_tasks(sources, model_dirs, body_cfg, family, pool)  # every task, before any is written
    tokenizer = load_tokenizer([base_dir, *model_dirs.values()])
    write_body(out / "checkpoints" / "base", body_cfg, base, tokenizer)
    log(
        f"download: base {sources.base.ref}: {len(base)} body tensors"
        + (f" (left out {len(dropped)} not in {body_cfg.architectures[0]}'s body, e.g. {dropped[0]})" if dropped else "")
    )
    facts: dict[str, Any] = {"metrics": {}, "num_labels": {}, "max_length": max_length, "rows": {}}
    for task, ts in sources.tasks.items():
        mdir = model_dirs[task]
        cfg, head_shapes, texts = checked[task]
        with Checkpoint(mdir) as ck:
            body = body_tensors(ck, body_shapes, base)
            head = head_tensors(ck, head_shapes, cfg)
        write_body(out / "checkpoints" / task, body_cfg, body)
        del body
        regression = cfg.num_labels == 1
        metric = task_metric(ts, regression)
        save_head(out / "heads" / f"{task}.safetensors", head, cfg, task, metric)
        rows = prepare_texts(ts, tokenizer, max_length, pool, sources.seed, cfg, out / "data" / task, log, texts)
        facts["metrics"][task] = metric
        facts["num_labels"][task] = cfg.num_labels
        facts["rows"][task] = rows
        log(
            f"download: {task}: body {len(body_shapes)} tensors, head {', '.join(head)} "
            f"({cfg.num_labels} {'output' if regression else 'labels'}), {metric}, {rows['test']} test rows"
            + (f", {rows['train']} query-pool rows" if rows.get("train") else "")
        )
    return facts


def check_tasks(sources: Sources, model_dirs: dict[str, Path], body_cfg, family: str, pool: int) -> dict[str, tuple]:
    """Every task's expert config and dataset checked before anything of the tasks is written:
    ``{task: (config, head shapes, TaskTexts)}``. All problems at once, in one line."""
    problems, checked = [], {}
    for task, ts in sources.tasks.items():
        mdir = model_dirs[task]
        try:
            cfg = load_config(mdir)
            if cfg.model_type != body_cfg.model_type:
                raise MergeflowError(
                    f"{mdir / 'config.json'}: model_type {cfg.model_type!r}, the base is {body_cfg.model_type!r}"
                )
            if getattr(cfg, "problem_type", None) == "multi_label_classification":
                raise MergeflowError(f"{mdir / 'config.json'}: multi-label classification heads are not supported")
            _, head_shapes = split_names(meta_model(cfg, mdir / "config.json"))
            if ts.dataset is None:
                raise MergeflowError(f"download.tasks.{task}.dataset: required for family {family}")
            checked[task] = (cfg, head_shapes, check_texts(ts, cfg, pool, sources.seed))
        except MergeflowError as exc:
            problems.append(f"task {task}: {exc}" if len(sources.tasks) > 1 else str(exc))
    if len(problems) == 1:
        raise MergeflowError(problems[0])
    if problems:
        raise MergeflowError(f"{len(problems)} tasks' data or experts are wrong: " + " | ".join(problems))
    return checked


def family_options(o: dict) -> tuple[int, int]:
    max_length, pool = o.get("max_length"), o.get("query_pool")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise MergeflowError(f"download.options.max_length: expected an integer >= 2, got {max_length!r}")
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 0:
        raise MergeflowError(f"download.options.query_pool: expected an integer >= 0, got {pool!r}")
    return max_length, pool


def body_tensors(ck, shapes: dict[str, tuple], base: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The body tensors of a checkpoint under the body's names (a missing prefix added), float32.
    Shapes must be the config's (``base`` None) or the base's; otherwise a one-line error naming
    the file and tensor."""
    have = set(ck.names())
    out = {}
    for name, shape in shapes.items():
        bare = name.split(".", 1)[1]
        key = name if name in have else bare if bare in have else None
        if key is None:
            raise MergeflowError(f"{ck.path}: tensor {name} missing: not a checkpoint of the base's architecture")
        got = tuple(ck.shape(key))
        want = tuple(base[name].shape) if base is not None else shape
        if got != want:
            whose = "the base has" if base is not None else "its config wants"
            raise MergeflowError(f"{ck.file_of(key)}: tensor {name} has shape {list(got)}, {whose} {list(want)}")
        t = ck.get(key)
        out[name] = t.to(torch.float32) if t.is_floating_point() else t
    return out


def head_tensors(ck, shapes: dict[str, tuple], cfg) -> dict[str, torch.Tensor]:
    have = set(ck.names())
    out = {}
    for name, shape in shapes.items():
        if name not in have:
            raise MergeflowError(
                f"{ck.path}: tensor {name} missing: not a sequence-classification fine-tune "
                f"(the head of {type(meta_model(cfg)).__name__} with num_labels {cfg.num_labels})"
            )
        if tuple(ck.shape(name)) != shape:
            raise MergeflowError(
                f"{ck.file_of(name)}: tensor {name} has shape {list(ck.shape(name))}, its config "
                f"(num_labels {cfg.num_labels}) wants {list(shape)}"
            )
        out[name] = ck.get(name).to(torch.float32)
    return out


def model_dir(ts: TaskSources) -> Path:
    root = Path(ts.model.path)
    sub = ts.options.get("subfolder")
    if not sub:
        return root
    if not isinstance(sub, str) or Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise MergeflowError(f"download.tasks.{ts.name}.subfolder: expected a relative folder, got {sub!r}")
    path = root / sub
    if not path.is_dir():
        raise MergeflowError(f"download.tasks.{ts.name}.subfolder: {sub!r} not found in {ts.model.ref} ({root})")
    return path


def write_body(folder: Path, config, tensors: dict[str, torch.Tensor], tokenizer=None) -> None:
    from safetensors.torch import save_file

    from mergeflow.io.atomic import atomic_dir

    with atomic_dir(folder) as tmp:
        config.to_json_file(str(tmp / "config.json"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def save_head(path: Path, tensors: dict[str, torch.Tensor], cfg, task: str, metric: str) -> None:
    from mergeflow.io.checkpoint import save_tensors

    save_tensors(
        path,
        tensors,
        metadata={
            "task": task,
            "metric": metric,
            "num_labels": str(cfg.num_labels),
            "config": cfg.to_json_string(use_diff=False),
        },
    )
