"""Model families: how each kind of model is downloaded, built, evaluated and routed.

* ``zoo`` / ``clip_vision`` (:mod:`mergeflow.models.vision`): CLIP-vision classifiers with
  per-task frozen heads (the built-in zoo, and CLIP ViT with zero-shot heads from the hub).
* ``text_classification`` (:mod:`mergeflow.models.text`): encoders fine-tuned for sequence
  classification (RoBERTa on GLUE); heads stay per task.
* ``causal_lm`` (:mod:`mergeflow.models.causal`): causal LMs and their LoRA adapters, by perplexity.

The interface is :class:`mergeflow.models.family.Family`; modules are imported on first use.
"""

from __future__ import annotations

import importlib

from mergeflow.errors import MergeflowError

FAMILIES = {
    "zoo": "mergeflow.models.vision:ZooVision",
    "clip_vision": "mergeflow.models.vision:ClipVision",
    "text_classification": "mergeflow.models.text:TextClassification",
    "causal_lm": "mergeflow.models.causal:CausalLM",
}


def get_family(name: str):
    """The Family class registered as ``name``."""
    if name not in FAMILIES:
        raise MergeflowError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
