"""Model family for text encoders fine-tuned for sequence classification (RoBERTa on GLUE).

Each task is a fine-tune of the same pretrained encoder with its own classification head. The
encoder body (the tensors under the model's ``base_model_prefix``, e.g. ``roberta.*``) is what
merging touches; the head stays per task and runs on the merged body at evaluation. Each task is
scored with its GLUE metric. Layout, metrics and data in full: docs/family-text.md.

The jobs live beside this module: :mod:`~mergeflow.models.text_build` (architecture),
:mod:`~mergeflow.models.text_data` (tokenised splits), :mod:`~mergeflow.models.text_metrics`
(GLUE metrics), :mod:`~mergeflow.models.text_download` (the download stage). Their public names
are re-exported here. transformers, datasets, scikit-learn and SciPy are imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models import text_download
from mergeflow.models.family import Family, Sources
from mergeflow.models.text_build import build_model, config_from_dict, load_config, meta_model, split_names
from mergeflow.models.text_data import Texts, read_texts
from mergeflow.models.text_download import body_tensors, head_tensors
from mergeflow.models.text_metrics import CLASSIFICATION_METRICS, GLUE, METRICS, REGRESSION_METRICS, glue_name, glue_score

__all__ = [
    "CLASSIFICATION_METRICS",
    "GLUE",
    "METRICS",
    "REGRESSION_METRICS",
    "TextClassification",
    "Texts",
    "body_tensors",
    "build_model",
    "glue_name",
    "glue_score",
    "head_tensors",
    "load_config",
    "meta_model",
    "read_texts",
    "split_names",
]


class TextClassification(Family):
    """Encoders fine-tuned for sequence classification (e.g. ``FacebookAI/roberta-base`` and its
    GLUE fine-tunes): the body is merged, heads stay per task; scored with each task's GLUE metric."""

    name = "text_classification"
    options = {
        "max_length": 128,  # tokens per input (pairs included), truncated: the papers' max_seq_length
        "query_pool": 1000,  # train rows kept per task for Auto-Switch's query set (seeded sample)
    }
    task_options = {
        "subfolder": None,  # the fine-tune's folder inside its repo (one repo holding every task's fine-tune)
        "subset": None,  # dataset config name (nyu-mll/glue: cola, sst2, ...)
        "split": None,  # evaluation split; default validation (validation_matched for MNLI)
        "train_split": "train",  # where the query pool is drawn from (skipped when missing)
        "text_columns": None,  # one or two columns; default GLUE's for the subset or task name
        "label_column": "label",
        "metric": None,  # default: the GLUE metric of the subset or task name (see docs/family-text.md)
    }

    # --- download ----------------------------------------------------------------------------

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:
        return text_download.prepare(sources, out, log, cls.name)

    # --- evaluate ----------------------------------------------------------------------------

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        self.config = load_config(self.artifacts / "checkpoints" / "base")
        self._heads: dict[tuple, dict[str, torch.nn.Module]] = {}
        self._head_meta: dict[str, tuple[Any, str]] = {}

    @property
    def pad_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def build(self, state_dict):
        return build_model(self.config, state_dict, device=self.device)

    def tensors(self, model):
        prefix = model.base_model_prefix + "."
        return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}

    def load_data(self, task, split, limit=None):
        return read_texts(self.artifacts / "data" / task / f"{split}.parquet", limit)

    def head_info(self, task: str) -> tuple[Any, str]:
        """(the fine-tune's config, the task's metric) from ``heads/<task>.safetensors``."""
        if task not in self._head_meta:
            from safetensors import safe_open

            path = self.artifacts / "heads" / f"{task}.safetensors"
            if not path.exists():
                raise MergeflowError(f"{path}: head file not found (run the download stage)")
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if "config" not in meta or "metric" not in meta:
                raise MergeflowError(f"{path}: metadata 'config' or 'metric' missing: not written by family {self.name}")
            self._head_meta[task] = (config_from_dict(json.loads(meta["config"]), path), meta["metric"])
        return self._head_meta[task]

    def head(self, task: str, device, dtype) -> dict[str, torch.nn.Module]:
        """The task's head modules (transformers' own, e.g. ``RobertaClassificationHead``), by the
        attribute of the sequence-classification model they take."""
        key = (task, str(device), dtype)
        if key not in self._heads:
            from safetensors.torch import load_file

            cfg, _ = self.head_info(task)
            path = self.artifacts / "heads" / f"{task}.safetensors"
            tensors = load_file(str(path))
            full = meta_model(cfg, path)
            modules = {}
            for name, module in full.named_children():
                if name == full.base_model_prefix:
                    continue
                sub = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
                try:
                    module.load_state_dict(sub, strict=True, assign=True)
                except RuntimeError as exc:
                    raise MergeflowError(
                        f"{path}: head {name} does not fit the config ({' '.join(str(exc).split())[:160]})"
                    ) from None
                modules[name] = module.to(device=device, dtype=dtype).eval()
            self._heads[key] = modules
        return self._heads[key]

    def _attach(self, model, task: str) -> None:
        param = next(model.base_model.parameters())
        for name, module in self.head(task, param.device, param.dtype).items():
            setattr(model, name, module)

    @torch.no_grad()
    def predict(self, model, task, data: Texts, rows=None):
        cfg, _ = self.head_info(task)
        self._attach(model, task)
        device = next(model.base_model.parameters()).device
        n = len(data) if rows is None else len(rows)
        regression = cfg.num_labels == 1
        out = torch.empty(n, dtype=torch.float32 if regression else torch.long)
        for pos, inputs in data.batches(rows, self.batch_size, self.pad_id, device):
            logits = model(**inputs).logits.float()
            out[pos] = (logits[:, 0] if regression else logits.argmax(-1)).cpu()
        return out

    def score(self, task, outputs, data: Texts):
        if len(data) == 0:
            raise MergeflowError(f"evaluate: task {task}: empty evaluation set")
        _, metric = self.head_info(task)
        return glue_score(metric, outputs, data.labels)

    @torch.no_grad()
    def features(self, model, data: Texts, rows=None):
        """The last layer's state of the first token (``<s>``, RoBERTa's CLS), float32 on the CPU."""
        device = next(model.base_model.parameters()).device
        n = len(data) if rows is None else len(rows)
        out = torch.empty(n, model.config.hidden_size, dtype=torch.float32)
        for pos, inputs in data.batches(rows, self.batch_size, self.pad_id, device):
            out[pos] = model.base_model(**inputs).last_hidden_state[:, 0].float().cpu()
        return out
