"""Loading ``.bin``/``.pt`` state dicts through ``torch.load(weights_only=True)`` only: a pickle
holding more than tensors is refused in one line, as are damaged files and non-dense tensors."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint_format import _one_line


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict through ``torch.load(weights_only=True)`` (mapped when zip format)."""
    try:
        with open(file, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the refusal says it
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|Please use|$)", str(exc), re.S)
        if reason:
            why = _one_line(reason.group(1)).rstrip(".") or "unsupported pickle content"
            raise MergeflowError(
                f"{file}: refused by torch.load(weights_only=True): it holds more than tensors, or is not a "
                f"torch.save file ({why})"
            ) from None
        raise MergeflowError(f"{file}: corrupt or truncated torch file ({_one_line(exc)})") from None
    except Exception as exc:  # torch.load raises many kinds on damaged files
        first = re.split(r"(?<=\.)\s", _one_line(exc), maxsplit=1)[0]
        raise MergeflowError(f"{file}: corrupt or truncated torch file ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise MergeflowError(f"{file}: not a state dict of tensors (top level is a {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else f"{value.layout} tensor"
            hint = " (nested state dicts are not supported)" if isinstance(value, dict) else ""
            raise MergeflowError(f"{file}: tensor {key} is a {kind}, not a dense tensor{hint}")
    return {str(k): v for k, v in obj.items()}
