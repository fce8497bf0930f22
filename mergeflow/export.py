"""``mergeflow export``: one task's deployable model from a workspace's merge, for one method.

- Text classifiers (``text_classification``): a Hugging Face folder that
  ``AutoModelForSequenceClassification`` loads as it is: the merged body under the architecture's
  prefix plus the task's own head in ``model.safetensors``, the fine-tune's config (``id2label`` /
  ``label2id``), and the base's tokenizer files.
- Vision towers (``zoo``, ``clip_vision``): the merged CLIP vision tower (``CLIPVisionModelWithProjection``
  loads it) with the task's zero-shot head in ``head.safetensors`` and its class names as the
  config's ``id2label``; logits are ``logit_scale * normalize(image_embeds) @ weight.T``.
- Causal LMs (``causal_lm``): the merged model with the base's tokenizer.

A dynamic or routed method (T-Switch, EMR, TALL masks, Auto-Switch) exports the task's own model
(for Auto-Switch, the task's switch: the model a correctly routed input gets). ``mergeflow_export.json``
records the method, task, the merge's method.json and the sources' pins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.params import Params
from mergeflow.stages.layout import Layout, require, tasks_of

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json", "adapter_config.json")


def task_model(p: Params, lay: Layout, method: str, task: str) -> dict[str, torch.Tensor]:
    """The state dict ``method`` gives ``task`` (checkpoint names), as evaluate builds it."""
    from mergeflow import methods
    from mergeflow.methods import EvalJob
    from mergeflow.stages.evaluate import stored_models

    tasks = tasks_of(p, lay)
    if task not in tasks:
        raise MergeflowError(f"--task: {task!r} is not one of this workspace's tasks ({', '.join(tasks)})")
    if method == "experts":
        return Checkpoint(require(lay.checkpoints / task, "download")).state_dict()
    m = methods.get(method)
    folder = lay.merged / method
    if method not in p.merge.methods or not (folder / "method.json").exists():
        raise MergeflowError(f"--method: {method!r} has no merge in {lay.merged} (list it in merge.methods and run the pipeline)")
    meta = json.loads((folder / "method.json").read_text())
    base = Checkpoint(require(lay.checkpoints / "base", "download")).state_dict()

    def no_scores(sd, t):  # export builds models, it scores none
        raise AssertionError("export does not score")

    job = EvalJob(
        tasks=tasks,
        folder=folder,
        meta=meta,
        base=base,
        family=None,
        data={},
        seed=p.seed,
        score=no_scores,
        models=lambda: iter(()),
    )
    for t, sd in (m.models or stored_models)(job):
        if t == task:
            return sd
    raise MergeflowError(f"{folder}: no model for task {task!r}")


def export(p: Params, root: Path, method: str, task: str, out: Path) -> dict:
    """Write ``out`` (atomically) and return what it holds: ``{"family", "files", ...}``."""
    lay = Layout(root)
    sources = json.loads(require(lay.sources, "download").read_text())
    family = sources.get("family", "zoo")
    sd = task_model(p, lay, method, task)
    record = {
        "method": method,
        "task": task,
        "family": family,
        "sources": {k: sources.get(k) for k in ("source", "base", "refs", "seed")},
    }
    if method != "experts":
        record["merge"] = json.loads((lay.merged / method / "method.json").read_text())
    with atomic_dir(out) as tmp:
        if family == "text_classification":
            _text(lay, task, sd, tmp)
        elif family in ("zoo", "clip_vision"):
            _vision(lay, task, sd, tmp)
        else:
            _copy_base_files(lay, tmp)
            _save(sd, tmp)
        (tmp / "mergeflow_export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        files = sorted(f.name for f in tmp.iterdir())
    return {"family": family, "files": files}


def _save(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _copy_base_files(lay: Layout, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """The base checkpoint's small files (tokenizer, config, generation config), not its weights."""
    base = lay.checkpoints / "base"
    for f in sorted(base.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in WEIGHT_FILES[:3] and f.name not in skip:
            shutil.copyfile(f, folder / f.name)


def _head(lay: Layout, task: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = require(lay.heads / f"{task}.safetensors", "download")
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _text(lay: Layout, task: str, body: dict[str, torch.Tensor], folder: Path) -> None:
    head, meta = _head(lay, task)
    if "config" not in meta:
        raise MergeflowError(f"{lay.heads / f'{task}.safetensors'}: no config in its metadata: not a text-classification head")
    _copy_base_files(lay, folder, skip=("config.json",))
    (folder / "config.json").write_text(json.dumps(json.loads(meta["config"]), indent=2) + "\n")
    _save({**body, **head}, folder)


def _vision(lay: Layout, task: str, tower: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    head, meta = _head(lay, task)
    classes = json.loads(meta.get("classes", "[]"))
    config = json.loads((lay.checkpoints / "base" / "config.json").read_text())
    config["id2label"] = {str(i): c for i, c in enumerate(classes)}
    config["label2id"] = {c: i for i, c in enumerate(classes)}
    _copy_base_files(lay, folder, skip=("config.json",))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save(tower, folder)
    save_file({"weight": head["weight"].contiguous()}, str(folder / "head.safetensors"), metadata=meta)
