"""Model-family adapter for CLIP-vision classifiers with per-task heads.

A task model is ``CLIPVisionModelWithProjection`` (the vision tower plus ``visual_projection``)
and a frozen head ``weight`` [n_classes, projection_dim] with a ``logit_scale``, as CLIP's
zero-shot heads are: logits = logit_scale * normalize(image_embeds) @ weight.T. Used by the
built-in zoo (``zoo://digits``) and by real CLIP ViT checkpoints.

transformers and datasets are imported lazily (importing them costs seconds).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError


def load_config(ckpt_dir: Path):
    """The ``CLIPVisionConfig`` of a checkpoint directory (a full ``CLIPConfig``'s vision part too)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    path = Path(ckpt_dir)
    path = path if path.name == "config.json" else path / "config.json"
    if not path.exists():
        raise MergeflowError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise MergeflowError(f"{path}: not valid JSON ({exc})") from None
    try:
        if raw.get("model_type") == "clip" or "vision_config" in raw:
            return CLIPConfig.from_dict(raw).vision_config
        return CLIPVisionConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise MergeflowError(f"{path}: not a CLIP vision config ({exc})") from None


def build_model(config, state_dict: dict[str, torch.Tensor], device="cpu") -> torch.nn.Module:
    """``CLIPVisionModelWithProjection`` in eval mode holding exactly ``state_dict``.

    Strict: a missing or unexpected tensor name, or a shape that doesn't fit the config, raises
    MergeflowError naming the tensor. Tensors keep their dtype, and on their own device they are
    used as they are (no copy): the model shares memory with ``state_dict``. The model is built
    on the meta device first, so no time goes into a random initialisation."""
    from transformers import CLIPVisionModelWithProjection

    config = _copy_config(config)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise MergeflowError(f"build_model: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
    if unexpected:
        raise MergeflowError(f"build_model: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected)")
    for name, ref in expected.items():
        if tuple(state_dict[name].shape) != tuple(ref.shape):
            raise MergeflowError(
                f"build_model: tensor {name} has shape {tuple(state_dict[name].shape)}, the config wants {tuple(ref.shape)}"
            )
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True, assign=True)
    # non-persistent buffers are not in the state dict: rebuild them on the device
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                module.register_buffer(buf_name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
            else:  # pragma: no cover - CLIP vision has no other non-persistent buffer
                raise MergeflowError(f"build_model: buffer {mod_name}.{buf_name} has no value")
    return model.eval()


def _copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    if getattr(config, "_attn_implementation", None) in (None, ""):
        config._attn_implementation = "eager"
    return config


def load_head(path: Path) -> tuple[torch.Tensor, float]:
    """(weight [n_classes, dim] float32, logit_scale) from a head ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"{path}: head file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if "weight" not in fh.keys():
                raise MergeflowError(f"{path}: no tensor 'weight' in head file")
            weight = fh.get_tensor("weight").to(torch.float32)
    except SafetensorError as exc:
        raise MergeflowError(f"{path}: not a safetensors file ({exc})") from None
    if weight.dim() != 2:
        raise MergeflowError(f"{path}: tensor 'weight' has shape {tuple(weight.shape)}, expected [n_classes, dim]")
    try:
        scale = float(meta.get("logit_scale", "1.0"))
    except ValueError:
        raise MergeflowError(f"{path}: metadata logit_scale {meta.get('logit_scale')!r} is not a number") from None
    return weight, scale


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [N, C, H, W] float32, labels [N] int64) of ``data_dir/<split>.parquet``.

    The splits are written by the ``datasets`` library (``Dataset.to_parquet``) and read back
    here straight through pyarrow (no datasets cache). The image shape comes from
    ``data_dir/meta.json`` ("shape": [C, H, W]); without it a square single-channel image is
    assumed."""
    import numpy as np
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    file = data_dir / f"{split}.parquet"
    if not file.exists():
        raise MergeflowError(f"{file}: split {split!r} not found")
    try:
        table = pq.read_table(str(file))
    except Exception as exc:  # pyarrow raises several kinds
        raise MergeflowError(f"{file}: not a readable parquet file ({exc})") from None
    for col in ("pixel_values", "label"):
        if col not in table.column_names:
            raise MergeflowError(f"{file}: column {col!r} missing (has {', '.join(table.column_names)})")
    pix = table.column("pixel_values").combine_chunks()
    lengths = np.asarray(pix.value_lengths())
    if len(lengths) and (lengths != lengths[0]).any():
        raise MergeflowError(f"{file}: pixel_values rows have different lengths")
    flat = np.asarray(pix.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    y = torch.from_numpy(np.asarray(table.column("label").to_numpy(), dtype=np.int64).copy())
    x = torch.from_numpy(flat.copy()).reshape(len(y), -1) if len(y) else torch.zeros(0, 0)
    meta_file = data_dir / "meta.json"
    if meta_file.exists():
        shape = json.loads(meta_file.read_text())["shape"]
    else:
        side = int(round(x.shape[1] ** 0.5))
        if side == 0 or side * side != x.shape[1]:
            raise MergeflowError(f"{file}: pixel_values of length {x.shape[1]} is no square image and {meta_file} is missing")
        shape = [1, side, side]
    try:
        x = x.reshape(len(y), *shape)
    except RuntimeError:
        raise MergeflowError(f"{file}: pixel_values don't fit the image shape {shape} of {meta_file}") from None
    return x, y


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised ``image_embeds`` of ``pixel_values``, in float32."""
    param = next(model.parameters())
    out = []
    for i in range(0, len(pixel_values), batch_size):
        batch = pixel_values[i : i + batch_size].to(device=param.device, dtype=param.dtype)
        out.append(model(pixel_values=batch).image_embeds.float())
    if not out:
        return torch.zeros(0, model.config.projection_dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def accuracy(model, head: torch.Tensor, logit_scale: float, pixel_values: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of logits = logit_scale * image_embeddings @ head.T."""
    if len(labels) == 0:
        raise MergeflowError("accuracy: empty evaluation set")
    emb = image_embeddings(model, pixel_values, batch_size)
    head = head.to(device=emb.device, dtype=torch.float32)
    pred = (logit_scale * emb @ head.T).argmax(-1).cpu()
    return float((pred == labels.cpu()).float().mean())
