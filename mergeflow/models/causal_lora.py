"""LoRA adapters of causal LMs (PEFT folders: ``adapter_config.json`` + ``adapter_model.safetensors``):
reading and checking them, their factors' names and shapes, and injecting an adapter into a model.

See docs/family-causal.md. peft is imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.causal_build import empty_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_PREFIX = "base_model.model."
# what every adapter must share with the first (the factors of one layout), and what is refused
SHARED_LORA_KEYS = (
    "target_modules",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "lora_bias",
    "fan_in_fan_out",
)


def is_adapter(folder: Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / ADAPTER_CONFIG).exists()


def lora_name(name: str) -> str:
    """A LoRA tensor's name as PEFT saves it: ``base_model.model.<module>.lora_A.weight`` (the
    adapter name that live parameters carry, ``.lora_A.default.weight``, taken out)."""
    name = re.sub(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$", r".\1.\2", name)
    name = re.sub(r"\.(lora_embedding_[AB])\.[^.]+$", r".\1", name)
    return name if name.startswith(LORA_PREFIX) else LORA_PREFIX + name


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: its config (dict), weights file and normalised names."""

    folder: Path
    config: dict
    weights: Path
    names: dict[str, str]  # normalised name -> name in the file

    @classmethod
    def read(cls, folder: Path) -> "Adapter":
        from mergeflow.io.checkpoint import Checkpoint, member_of

        folder = Path(folder)
        cfg_path = member_of(folder, ADAPTER_CONFIG)
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise MergeflowError(f"{cfg_path}: not valid JSON ({' '.join(str(exc).split())[:160]})") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            kind = config.get("peft_type") if isinstance(config, dict) else None
            raise MergeflowError(f"{cfg_path}: peft_type {kind!r}, only LoRA adapters (LORA) are supported")
        if config.get("use_dora"):
            raise MergeflowError(
                f"{cfg_path}: use_dora: DoRA adapters are not supported (their magnitudes are no delta over zero)"
            )
        if config.get("modules_to_save"):
            raise MergeflowError(
                f"{cfg_path}: modules_to_save {config['modules_to_save']}: fully trained modules beside "
                f"the factors are not supported"
            )
        if config.get("bias", "none") != "none":
            raise MergeflowError(f"{cfg_path}: bias {config['bias']!r}: trained base biases are not supported (bias: none)")
        weights = next((member_of(folder, f) for f in ADAPTER_WEIGHTS if (folder / f).exists()), None)
        if weights is None:
            raise MergeflowError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
        names: dict[str, str] = {}
        for n in Checkpoint(weights).names():
            norm = lora_name(n)
            if norm in names:
                raise MergeflowError(f"{weights}: tensors {names[norm]} and {n} are the same factor")
            names[norm] = n
        return cls(folder, config, weights, names)

    def shared(self) -> dict:
        out = {}
        for key in SHARED_LORA_KEYS:
            v = self.config.get(key)
            out[key] = sorted(v) if isinstance(v, list) else v
        return out

    def lora_config(self):
        return lora_config(self.folder)


def lora_config(folder: Path):
    """PEFT's ``LoraConfig`` of ``folder/adapter_config.json``, for inference."""
    from peft import LoraConfig

    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - peft raises several kinds
        raise MergeflowError(
            f"{Path(folder) / ADAPTER_CONFIG}: not a LoRA config peft can read ({' '.join(str(exc).split())[:160]})"
        ) from None
    cfg.inference_mode = True
    return cfg


def inject_lora(model, lora_config):
    """A PEFT model over ``model`` (changed in place) with a fresh LoRA adapter, on the meta device
    where ``model`` is. Not ``low_cpu_mem_usage``: PEFT then patches ``nn.Module`` for every thread
    (see :func:`~mergeflow.models.causal_build.empty_model`); the adapter's factors are small enough to allocate."""
    from peft import get_peft_model

    first = next(model.parameters(), None)
    with torch.device("meta") if first is not None and first.is_meta else contextlib.nullcontext():
        return get_peft_model(model, copy.deepcopy(lora_config))


def lora_shapes(backbone_config, lora_config, where: Path) -> dict[str, tuple[int, ...]]:
    """The adapter factors PEFT makes for this config over the backbone: normalised name -> shape."""
    model = empty_model(backbone_config, meta_buffers=True)
    try:
        peft_model = inject_lora(model, lora_config)
    except ValueError as exc:
        raise MergeflowError(f"{where}: does not fit the base model ({' '.join(str(exc).split())[:200]})") from None
    return {lora_name(n): tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n}


def check_adapters(adapters: dict[str, Adapter], backbone_config) -> dict[str, tuple[int, ...]]:
    """Every adapter: the first one's target modules, r and lora_alpha, and exactly the factors
    PEFT makes over the backbone for that config. Returns their names and shapes."""
    from mergeflow.io.checkpoint import Checkpoint

    tasks = list(adapters)
    first = adapters[tasks[0]]
    ref = first.shared()
    for t in tasks[1:]:
        mine = adapters[t].shared()
        for key in SHARED_LORA_KEYS:
            if mine[key] != ref[key]:
                raise MergeflowError(
                    f"{adapters[t].folder / ADAPTER_CONFIG}: {key} {mine[key]!r} differs from "
                    f"{ref[key]!r} of {first.folder / ADAPTER_CONFIG} (adapters must share "
                    f"target modules, r and lora_alpha)"
                )
    shapes = lora_shapes(backbone_config, first.lora_config(), first.folder / ADAPTER_CONFIG)
    for t in tasks:
        ad = adapters[t]
        ck = Checkpoint(ad.weights)
        if missing := [n for n in shapes if n not in ad.names]:
            raise MergeflowError(
                f"{ad.weights}: tensor {missing[0]} missing ({len(missing)} missing) for its target modules over the base"
            )
        if extra := [n for n in ad.names if n not in shapes]:
            raise MergeflowError(f"{ad.weights}: tensor {ad.names[extra[0]]} is no LoRA factor of its config over the base")
        for n, shape in shapes.items():
            if tuple(ck.shape(ad.names[n])) != shape:
                raise MergeflowError(
                    f"{ad.weights}: tensor {ad.names[n]} has shape {list(ck.shape(ad.names[n]))}, "
                    f"r and the base want {list(shape)}"
                )
    return shapes
