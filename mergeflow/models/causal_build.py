"""Causal LMs' architecture: configs, empty models on the meta device, and building an
``AutoModelForCausalLM`` that holds exactly a state dict (tied weights tied again).

transformers and peft are imported lazily (importing them costs seconds).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError


def load_config(folder: Path):
    """The transformers config of a causal-LM checkpoint folder; a one-line error otherwise."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    if not path.exists():
        raise MergeflowError(f"{path}: config.json not found")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise MergeflowError(f"{path}: not a usable transformers config ({' '.join(str(exc).split())[:200]})") from None
    return config


def empty_model(config, meta_buffers: bool = False):
    """``AutoModelForCausalLM`` of ``config`` with its parameters on the meta device; its
    non-persistent buffers (rotary frequencies) computed for real on the CPU unless ``meta_buffers``.

    Built under ``torch.device("meta")``, which is local to the calling thread: accelerate's
    ``init_empty_weights`` patches ``nn.Module`` for every thread, and two stage units building
    at once would leave it patched for good."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise MergeflowError(
            f"model type {config.model_type!r}: no causal LM in transformers ({' '.join(str(exc).split())[:160]})"
        ) from None
    if not meta_buffers:
        _materialise_buffers(model)
    return model


def _materialise_buffers(model) -> None:
    """Give the meta buffers their values on the CPU the way transformers does when it loads a
    checkpoint: a fresh tensor, then the model's own ``_init_weights`` for the module holding it.
    A buffer that stays unset is a one-line MergeflowError naming it."""
    for mod_name, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        for n in metas:
            old = module._buffers[n]
            fresh = torch.empty_like(old, device="cpu")
            if fresh.is_floating_point():
                fresh.fill_(float("nan"))
            module._buffers[n] = fresh
        model._init_weights(module)
        for n in metas:
            b = module._buffers[n]
            if not b.is_floating_point() or torch.isnan(b).any():
                raise MergeflowError(f"build: buffer {mod_name}.{n} has no value (transformers does not initialise it)")


def model_names(model) -> tuple[list[str], dict[str, str]]:
    """(the state-dict names a checkpoint holds, {tied name: the name it is tied to}): a tied
    ``lm_head.weight`` is the embedding itself and is not stored."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return [n for n in model.state_dict() if n not in aliases], aliases


def build_causal(config, state_dict: dict[str, torch.Tensor], device="cpu") -> torch.nn.Module:
    """``AutoModelForCausalLM`` in eval mode holding exactly ``state_dict`` (tied weights tied again).

    Strict: a missing or unexpected tensor, or a shape that does not fit the config, is a one-line
    MergeflowError naming the tensor. Tensors keep their dtype and, on their own device, are used
    as they are: the model shares memory with ``state_dict``."""
    model = empty_model(config)
    names, aliases = model_names(model)
    expected = model.state_dict()
    missing = [n for n in names if n not in state_dict]
    unexpected = sorted(n for n in state_dict if n not in expected or n in aliases)
    if missing:
        raise MergeflowError(f"build: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
    if unexpected:
        raise MergeflowError(f"build: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected)")
    for name in names:
        if tuple(state_dict[name].shape) != tuple(expected[name].shape):
            raise MergeflowError(
                f"build: tensor {name} has shape {tuple(state_dict[name].shape)}, the config wants {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=False, assign=True)
    for name, source in aliases.items():  # re-tie: assignment replaced the source parameter only
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    if meta := [n for n, p in model.named_parameters() if p.is_meta]:  # pragma: no cover - guarded above
        raise MergeflowError(f"build: tensor {meta[0]} has no value")
    model.requires_grad_(False)
    return model.to(device).eval()  # buffers to the device; parameters are there already


def decoder_of(model):
    """The transformer body (last hidden states) of a causal LM, inside a PEFT wrapper too."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_decoder()
