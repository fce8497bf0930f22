"""Model families for CLIP-vision classifiers with per-task heads (``zoo`` and ``clip_vision``).

A task model is ``CLIPVisionModelWithProjection`` (the vision tower plus ``visual_projection``)
and a frozen head ``weight`` [n_classes, projection_dim] with a ``logit_scale``, as CLIP's
zero-shot heads are: logits = logit_scale * normalize(image_embeds) @ weight.T. Used by the
built-in zoo (``zoo://digits``) and by real CLIP ViT checkpoints.

The jobs live beside this module: :mod:`~mergeflow.models.vision_build` (architecture),
:mod:`~mergeflow.models.vision_heads` (heads and accuracy), :mod:`~mergeflow.models.vision_data`
(image splits), :mod:`~mergeflow.models.vision_download` (the download stage). Their public
names are re-exported here. transformers and datasets are imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models import vision_download
from mergeflow.models.family import Family, Sources
from mergeflow.models.vision_build import VISION_PREFIXES, build_model, image_embeddings, load_config
from mergeflow.models.vision_data import Images, load_split
from mergeflow.models.vision_heads import DEFAULT_TEMPLATES, TEMPLATES, accuracy, load_head, zero_shot_head

__all__ = [
    "DEFAULT_TEMPLATES",
    "TEMPLATES",
    "VISION_PREFIXES",
    "ClipVision",
    "Images",
    "ZooVision",
    "accuracy",
    "build_model",
    "image_embeddings",
    "load_config",
    "load_head",
    "load_split",
    "zero_shot_head",
]


class _VisionFamily(Family):
    """Shared evaluation of CLIP-vision classifiers: top-1 accuracy of logit_scale * emb @ head.T."""

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        self.config = load_config(self.artifacts / "checkpoints" / "base")
        self._heads: dict[str, tuple[torch.Tensor, float]] = {}

    def build(self, state_dict):
        return build_model(self.config, state_dict, device=self.device)

    def head(self, task: str) -> tuple[torch.Tensor, float]:
        if task not in self._heads:
            weight, scale = load_head(self.artifacts / "heads" / f"{task}.safetensors")
            self._heads[task] = (weight.to(self.device), scale)
        return self._heads[task]

    def features(self, model, data: Images, rows=None):
        return image_embeddings(model, data.pixel_values(rows, self.batch_size), self.batch_size).cpu()

    @torch.no_grad()
    def predict(self, model, task, data: Images, rows=None):
        head, scale = self.head(task)
        emb = image_embeddings(model, data.pixel_values(rows, self.batch_size), self.batch_size)
        return (scale * emb @ head.to(emb).T).argmax(-1).cpu()

    def score(self, task, outputs, data: Images):
        if len(data) == 0:
            raise MergeflowError(f"evaluate: task {task}: empty evaluation set")
        return {"score": float((outputs.cpu() == data.labels).float().mean()), "metric": "accuracy"}


class ZooVision(_VisionFamily):
    """The built-in zoo (``zoo://digits``): pixel values stored ready in ``data/<task>/<split>.parquet``."""

    name = "zoo"

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:  # pragma: no cover - the zoo is built by mergeflow.zoo
        raise MergeflowError("the zoo is built by the download stage from zoo:// sources, not prepared from downloads")

    def load_data(self, task, split, limit=None):
        x, y = load_split(self.artifacts / "data" / task, split)
        if limit:
            x, y = x[:limit], y[:limit]
        return Images(labels=y, pixels=x)


class ClipVision(_VisionFamily):
    """CLIP ViT from the hub or local folders (e.g. ``openai/clip-vit-base-patch32`` and the
    ``tanganke/clip-vit-base-patch32_<task>`` fine-tunes, datasets ``tanganke/<task>``).

    The vision tower (``vision_model.*`` and ``visual_projection``) is merged. Each task's head is
    CLIP's zero-shot classifier built once at download from its class names and prompt templates
    with the base's text tower: the mean over templates of the normalised text embeddings,
    normalised again, with the base's ``logit_scale``. Images go through the base's own processor.
    A fine-tune saved as a bare ``CLIPVisionModel`` (no ``visual_projection``) takes the base's.
    """

    name = "clip_vision"
    options = {"query_pool": 1000}  # train rows kept for Auto-Switch's query set (seeded sample)
    task_options = {
        "split": "test",  # evaluation split
        "train_split": "train",  # where the query set is drawn from (skipped when missing)
        "subset": None,  # dataset config name
        "image_column": "image",
        "label_column": "label",
        "classnames": None,  # default: the dataset's ClassLabel names, underscores as spaces
        "templates": None,  # default: the suite's templates for known task names, else "a photo of a {}."
    }

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:
        return vision_download.prepare(sources, out, log)

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            # the PIL backend: the default one needs torchvision
            self._processor = AutoImageProcessor.from_pretrained(str(self.artifacts / "checkpoints" / "base"), backend="pil")
        return self._processor

    def load_data(self, task, split, limit=None):
        from mergeflow.models.data import read_table

        table = read_table(self.artifacts / "data" / task / f"{split}.parquet", ("image", "label"), limit)
        labels = torch.as_tensor(table.column("label").to_pylist(), dtype=torch.int64)
        return Images(labels=labels, images=table.column("image").to_pylist(), processor=self.processor)
