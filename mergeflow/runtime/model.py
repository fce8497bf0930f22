"""Serving with task switches: ``SwitchModel`` (a model whose batches are grouped by switch
combination, each applied once per batch) and ``load_runtime`` (a base checkpoint and switch
files to a runtime); see docs/runtime.md."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from mergeflow.autoswitch import group_rows
from mergeflow.codecs.switch import Switch
from mergeflow.errors import MergeflowError
from mergeflow.runtime.packing import PackedSwitch
from mergeflow.runtime.switch_runtime import SwitchRuntime


def _take(inputs: Any, rows: torch.Tensor) -> Any:
    """The rows of a batch: a tensor, a mapping of tensors (e.g. tokenizer output) or a sequence."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows.to(inputs.device)]
    if isinstance(inputs, Mapping):
        return {k: _take(v, rows) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [inputs[i] for i in rows.tolist()]
    raise MergeflowError(f"cannot split inputs of type {type(inputs).__name__} into rows")


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        sizes = {_batch_size(v) for v in inputs.values()}
        if len(sizes) != 1:
            raise MergeflowError(f"inputs have differing batch sizes {sorted(sizes)}")
        return sizes.pop()
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise MergeflowError(f"cannot split inputs of type {type(inputs).__name__} into rows")


def _default_forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class SwitchModel:
    """A model served with task switches: the base held once, switches applied per batch.

    ``switches`` maps task names to switches; weight columns follow their order (``names``).
    ``router`` (optional) maps inputs to weights [B, T] (e.g. Auto-Switch's kNN routing).
    The model's parameters and buffers are switched in place (``runtime``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        switches: Mapping[str, Switch | PackedSwitch],
        router: Callable[[Any], torch.Tensor] | None = None,
        *,
        chunk: int | None = None,
        workers: int | None = None,
    ):
        self.model = model
        params = dict(model.named_buffers())
        params.update(dict(model.named_parameters()))
        self.runtime = SwitchRuntime(params, switches, chunk=chunk, workers=workers)
        self.router = router

    @property
    def names(self) -> list[str]:
        return self.runtime.names

    @torch.no_grad()
    def predict(
        self,
        inputs: Any,
        weights: torch.Tensor | Mapping[str, float] | None = None,
        forward: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Outputs of the model for ``inputs`` (a batch), each row under its switch combination.

        ``weights``: [B, T] (one row per input, columns in ``names`` order), a mapping (one
        combination for the whole batch), or None to ask the router. Rows with identical
        weights form one group: each group's combination is applied once, the group runs
        through ``forward(model, rows_of_inputs)`` (default ``model(rows)``) and the combination
        is removed. Outputs (a tensor whose first dimension is the rows) come back in input order.
        """
        forward = forward or _default_forward
        if weights is None:
            if self.router is None:
                raise MergeflowError("predict needs weights, or a router to compute them")
            weights = self.router(inputs)
        if isinstance(weights, Mapping):
            with self.runtime.use(weights):
                return forward(self.model, inputs)
        weights = torch.as_tensor(weights)
        n = _batch_size(inputs)
        if weights.dim() != 2 or weights.shape[0] != n or weights.shape[1] != len(self.names):
            raise MergeflowError(f"weights must be [{n}, {len(self.names)}] (inputs x switches), got {list(weights.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise MergeflowError("weights hold non-finite values")
        if self.runtime.active is not None:
            raise MergeflowError(f"a switch combination is already applied ({self.runtime.active}): remove() it first")
        out: torch.Tensor | None = None
        try:
            for row, rows in group_rows(weights):
                self.runtime.switch(row)  # from the previous group's combination in one pass
                result = forward(self.model, _take(inputs, rows))
                if not isinstance(result, torch.Tensor) or result.dim() < 1 or result.shape[0] != rows.numel():
                    raise MergeflowError(
                        f"forward must return a tensor with one row per input, got "
                        f"{list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__}"
                    )
                if out is None:
                    out = result.new_empty((n, *result.shape[1:]))
                out[rows.to(out.device)] = result
        finally:
            self.runtime.remove()
        if out is None:
            raise MergeflowError("predict got an empty batch")
        return out


def load_runtime(
    base_dir: str | os.PathLike,
    switch_paths: Mapping[str, str | os.PathLike],
    device: str | torch.device | None = None,
    *,
    chunk: int | None = None,
    workers: int | None = None,
) -> tuple[dict[str, torch.Tensor], SwitchRuntime]:
    """(state dict of the base, runtime switching it in place) from a checkpoint and switch files.

    Tensors keep their stored dtypes; ``device`` moves the state dict there first (the
    switches' bits follow their tensors)."""
    from mergeflow.codecs.switch import load_switch
    from mergeflow.io.checkpoint import Checkpoint

    with Checkpoint(base_dir) as ckpt:
        state = ckpt.state_dict()
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    switches = {key: load_switch(path) for key, path in switch_paths.items()}
    return state, SwitchRuntime(state, switches, chunk=chunk, workers=workers)
