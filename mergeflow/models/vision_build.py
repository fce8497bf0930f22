"""CLIP-vision architecture: configs, building ``CLIPVisionModelWithProjection`` (the vision tower
plus ``visual_projection``) that holds exactly a state dict, and its image embeddings.

transformers is imported lazily (importing it costs seconds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergeflow.errors import MergeflowError

VISION_PREFIXES = ("vision_model.", "visual_projection.")


def load_config(ckpt_dir: Path):
    """The ``CLIPVisionConfig`` of a checkpoint directory (a full ``CLIPConfig``'s vision part too)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from mergeflow.models.family import read_config

    path, raw = read_config(ckpt_dir)
    try:
        if raw.get("model_type") == "clip" or "vision_config" in raw:
            full = CLIPConfig.from_dict(raw)
            vision = full.vision_config
            vision.projection_dim = full.projection_dim  # the projection's size is the full model's
            return vision
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

    config = copy_config(config)
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


def copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    if getattr(config, "_attn_implementation", None) in (None, ""):
        config._attn_implementation = "eager"
    return config


def vision_names(config) -> list[str]:
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(copy_config(config))
    return list(model.state_dict())


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
