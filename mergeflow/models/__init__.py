"""Model-family adapters: how to build a model from a config and a state dict, and evaluate it.

``mergeflow.models.vision``: CLIP-vision classifiers with per-task frozen heads (the built-in
zoo ``zoo://digits`` and real CLIP ViT checkpoints).
"""
