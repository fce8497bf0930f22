"""Text encoders' architecture: configs, the sequence-classification model on the meta device,
its body / head split, and building a model whose body holds exactly a state dict.

transformers is imported lazily (importing it costs seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergeflow.errors import MergeflowError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_config(folder: Path):
    """The transformers config of a checkpoint folder, as a one-line error when unreadable."""
    from mergeflow.models.family import read_config

    path, raw = read_config(folder)
    return config_from_dict(raw, path)


def config_from_dict(raw: dict, where) -> Any:
    from transformers import CONFIG_MAPPING

    kind = raw.get("model_type")
    if kind not in CONFIG_MAPPING:
        raise MergeflowError(f"{where}: unknown model_type {kind!r}")
    try:
        return CONFIG_MAPPING[kind].from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise MergeflowError(f"{where}: not a {kind} config ({' '.join(str(exc).split())[:160]})") from None


def meta_model(config, where="config") -> PreTrainedModel:
    """``AutoModelForSequenceClassification`` of ``config`` on the meta device (no memory, no init)."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise MergeflowError(
            f"{where}: model type {config.model_type!r} has no sequence-classification model "
            f"in transformers ({' '.join(str(exc).split())[:120]})"
        ) from None


def split_names(model: PreTrainedModel) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({body tensor: shape}, {head tensor: shape}) of a sequence-classification model: the body
    is everything under its ``base_model_prefix``, the head everything else."""
    prefix = model.base_model_prefix + "."
    body: dict[str, tuple] = {}
    head: dict[str, tuple] = {}
    for name, t in model.state_dict().items():
        (body if name.startswith(prefix) else head)[name] = tuple(t.shape)
    return body, head


def body_config(config):
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.architectures = [type(meta_model(cfg)).__name__]
    return cfg


def position_limit(config) -> int | None:
    """Tokens an input may have: RoBERTa-style position ids start after the padding index."""
    mpe = getattr(config, "max_position_embeddings", None)
    if mpe is None:
        return None
    if "roberta" in config.model_type or config.model_type == "camembert":
        return mpe - int(config.pad_token_id or 0) - 1
    return mpe


def _rebuild_buffers(model: torch.nn.Module, device) -> None:
    """Non-persistent buffers are not in a state dict: make the meta ones again, on ``device``."""
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
            elif buf_name == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=torch.long, device=device)
            else:
                raise MergeflowError(f"build: buffer {mod_name}.{buf_name} has no value")
            module.register_buffer(buf_name, value, persistent=False)


def build_model(config, state_dict: dict[str, torch.Tensor], device="cpu") -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` in eval mode whose body holds exactly ``state_dict``.

    Strict: a missing or unexpected body tensor, or a shape the config doesn't want, raises
    MergeflowError naming the tensor. Tensors keep their dtype and, on their own device, are used
    as they are (the model shares memory with ``state_dict``). The head stays on the meta device
    until a task's head is attached (:meth:`TextClassification.predict`)."""
    model = meta_model(config)
    expected, _ = split_names(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise MergeflowError(f"build: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
    if unexpected:
        raise MergeflowError(
            f"build: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected; "
            f"heads are per task, not part of the body)"
        )
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise MergeflowError(f"build: tensor {name} has shape {tuple(state_dict[name].shape)}, the config wants {shape}")
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=False, assign=True)
    _rebuild_buffers(model.base_model, device)
    return model.eval()
