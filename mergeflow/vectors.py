"""Task vectors: tau_t = theta_t - theta_0, computed tensor by tensor in float32."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from mergeflow.io.checkpoint import Checkpoint, check_compatible, check_finite, save_tensors


def iter_task_vector(base: Checkpoint, model: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, theta_t - theta_0) in float32 for every floating tensor of the base."""
    check_compatible(base, model)
    for name in base.names():
        b = base.get(name)
        if not b.is_floating_point():
            continue
        m = model.get(name)
        check_finite(name, b, base.path)
        check_finite(name, m, model.path)
        yield name, m.float() - b.float()


def extract_task_vector(base: Checkpoint, model: Checkpoint, out: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write the task vector of ``model`` as a float32 safetensors file; return its parameter count."""
    tau = dict(iter_task_vector(base, model))
    # names, not absolute paths: the same inputs in another workspace give the same bytes
    save_tensors(out, tau, metadata={"kind": "task_vector", "base": base.path.name, "model": model.path.name, **(metadata or {})})
    return sum(t.numel() for t in tau.values())
