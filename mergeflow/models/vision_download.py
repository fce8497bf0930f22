"""The ``clip_vision`` family's download stage: the vision tower of the base and of every fine-tune
into ``checkpoints/`` (float32), each task's zero-shot head into ``heads/``, its images into ``data/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import Sources
from mergeflow.models.vision_build import copy_config, load_config, vision_names
from mergeflow.models.vision_data import load_image_splits, save_images
from mergeflow.models.vision_heads import DEFAULT_TEMPLATES, TEMPLATES, save_head, text_tower, zero_shot_head


def prepare(sources: Sources, out: Path, log) -> dict:
    """``ClipVision.prepare``: write ``out/checkpoints``, ``out/heads`` and ``out/data``; the facts
    for sources.json."""
    from mergeflow.io.checkpoint import Checkpoint

    base_dir = sources.base.path
    config = load_config(base_dir)
    names = vision_names(config)
    base = Checkpoint(base_dir)
    base_tensors = vision_tensors(base, names, base_dir, fallback=None)
    write_vision(out / "checkpoints" / "base", config, base_tensors, copy_from=base_dir)
    model, tokenizer, scale = text_tower(base_dir, base)
    heads_dir = out / "heads"
    heads_dir.mkdir(parents=True, exist_ok=True)
    facts: dict[str, dict[str, Any]] = {"metrics": {}, "classes": {}}
    for task, ts in sources.tasks.items():
        ck = Checkpoint(ts.model.path)
        tensors = vision_tensors(ck, names, ts.model.path, fallback=base_tensors)
        write_vision(out / "checkpoints" / task, config, tensors)
        del tensors
        if ts.dataset is None:
            raise MergeflowError(f"download.tasks.{task}.dataset: required for family clip_vision")
        test, train, classes = load_image_splits(ts, sources.options["query_pool"], sources.seed)
        templates = ts.options["templates"] or TEMPLATES.get(task.lower(), DEFAULT_TEMPLATES)
        weight = zero_shot_head(model, tokenizer, classes, templates)
        save_head(heads_dir / f"{task}.safetensors", weight, scale, task, classes)
        save_images(out / "data" / task / "test.parquet", test)
        if train is not None:
            save_images(out / "data" / task / "train.parquet", train)
        facts["metrics"][task] = "accuracy"
        facts["classes"][task] = len(classes)
        log(
            f"download: {task}: vision tower {len(names)} tensors, head {len(classes)} classes x "
            f"{len(templates)} templates, {len(test)} test images"
            + (f", {len(train)} query-pool images" if train is not None else "")
        )
    return facts


def vision_tensors(ck, names: list[str], where: Path, fallback: dict | None) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a CLIP checkpoint (full CLIPModel or vision-only), float32."""
    have = set(ck.names())
    out = {}
    for name in names:
        bare = name.removeprefix("vision_model.")
        if name in have:
            t = ck.get(name)
        elif bare != name and bare in have:
            t = ck.get(bare)  # a CLIPVisionModel saved by transformers 5 names its tensors without the prefix
        elif name.startswith("visual_projection.") and fallback is not None:
            t = fallback[name]  # a bare CLIPVisionModel fine-tune: the projection stayed the base's
        else:
            raise MergeflowError(f"{where}: tensor {name} missing: not a CLIP vision checkpoint of the base's architecture")
        if fallback is not None and tuple(t.shape) != tuple(fallback[name].shape):
            raise MergeflowError(f"{where}: tensor {name} has shape {tuple(t.shape)}, the base has {tuple(fallback[name].shape)}")
        out[name] = t.to(torch.float32)
    return out


def write_vision(folder: Path, config, tensors: dict[str, torch.Tensor], copy_from: Path | None = None) -> None:
    import shutil

    from safetensors.torch import save_file

    from mergeflow.io.atomic import atomic_dir

    cfg = copy_config(config)
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    with atomic_dir(folder) as tmp:
        cfg.to_json_file(str(tmp / "config.json"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("preprocessor_config.json",):
            if copy_from is not None and (Path(copy_from) / name).exists():
                shutil.copyfile(Path(copy_from) / name, tmp / name)
