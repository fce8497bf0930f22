"""What the pipeline's stages hand a method's hooks (``write``, ``models``, ``evaluate``).

The stages build these; a method's hook reads what it needs and writes into ``dst``, so no
stage names a method. ``MergeJob.merge`` runs the engine into ``dst`` (what a method without a
``write`` hook gets); ``EvalJob.score`` scores one state dict on one task.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


@dataclasses.dataclass
class MergeJob:
    tasks: list[str]
    base: Any  # mergeflow.io.checkpoint.Checkpoint of theta_0
    hp: dict[str, Any]  # the method's hyper-parameters, those ``set_by`` other stages filled in
    dst: Path  # the method's folder, empty; the stage writes method.json into it afterwards
    device: torch.device
    vector: Callable[[str], Path]  # a task's task vector (extract stage)
    switch: Callable[[str], Path]  # a task's switch file (compress stage)
    queries: Callable[[], Path]  # the Auto-Switch query set (compress stage)
    merge: Callable[..., object]  # merge(method, sources, hp, data=None): the engine into ``dst`` (its return unused)
    layer_inputs: Callable[[int], list]  # n exemplars' layer-input statistics per task
    log: Callable[[str], None] = print


@dataclasses.dataclass
class EvalJob:
    tasks: list[str]
    folder: Path  # what the merge stage wrote for the method
    meta: dict[str, Any]  # its method.json
    base: dict[str, torch.Tensor]  # theta_0's state dict
    family: Any  # mergeflow.models.family.Family
    data: dict[str, Any]  # test data per task
    seed: int
    score: Callable[[dict[str, torch.Tensor], str], dict]  # a state dict's scores on a task
    models: Callable[[], Iterator[tuple[str, dict[str, torch.Tensor]]]]  # (task, state dict) of the method
