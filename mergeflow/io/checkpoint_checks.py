"""Checks on checkpoints and tensors: same names, shapes and floating dtypes as a base, and
finite values; each failure a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from mergeflow.errors import MergeflowError

if TYPE_CHECKING:
    from mergeflow.io.checkpoint_like import TensorLayout


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_compatible(base: TensorLayout, other: TensorLayout, names: Iterable[str] | None = None) -> None:
    """Same tensor names, shapes and floating dtypes as the base, or a one-line error naming the first difference."""
    want = set(base.names() if names is None else names)
    have = set(other.names())
    if missing := sorted(want - have):
        raise MergeflowError(f"{other.path}: tensor {missing[0]} of the base is missing")
    if names is None and (extra := sorted(have - want)):
        raise MergeflowError(f"{other.path}: tensor {extra[0]} is not in the base {base.path}")
    for name in sorted(want):
        if base.shape(name) != other.shape(name):
            raise MergeflowError(
                f"{other.path}: tensor {name} has shape {list(other.shape(name))}, base has {list(base.shape(name))}"
            )
        bdt, odt = base.tensor_dtype(name), other.tensor_dtype(name)
        if bdt != odt and (bdt.is_floating_point or odt.is_floating_point):
            raise MergeflowError(
                f"{other.path}: tensor {name} has dtype {_dtype_name(odt)}, base {base.path} has {_dtype_name(bdt)}"
            )


def check_finite(name: str, tensor: torch.Tensor, source: Path | str) -> None:
    """A one-line error if a floating tensor holds NaN or Inf.

    One min/max reduction (NaN propagates through both, an Inf becomes one of them): no
    temporary the size of the tensor, unlike ``isfinite(t).all()``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        kind = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise MergeflowError(f"{source}: tensor {name} contains {kind}")
