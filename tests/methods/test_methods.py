"""Static merges against their formulas, and the registry's hyper-parameter checks."""

from __future__ import annotations

import pytest
import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError


def _taus(n=3, shape=(5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_task_arithmetic_formula():
    taus = _taus()
    out = methods.get("task_arithmetic")("w", torch.zeros(5, 4), taus, scaling=0.3)
    assert torch.allclose(out, 0.3 * (taus[0] + taus[1] + taus[2]))


def test_task_arithmetic_hand_case():
    out = methods.get("task_arithmetic")("w", torch.zeros(2), [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])], scaling=0.5)
    assert out.tolist() == [2.0, -0.75]


def test_weight_average_is_mean_of_models():
    base = torch.randn(5, 4)
    taus = _taus()
    merged = base + methods.get("weight_average")("w", base, taus)
    assert torch.allclose(merged, torch.stack([base + t for t in taus]).mean(0), atol=1e-6)


def test_hyper_defaults_and_checks():
    ta = methods.get("task_arithmetic")
    assert ta.hyper() == {"scaling": 0.3}
    assert ta.hyper({"scaling": 1}) == {"scaling": 1.0}
    with pytest.raises(MergeflowError, match="scalling: unknown hyper-parameter"):
        ta.hyper({"scalling": 0.3})
    with pytest.raises(MergeflowError, match="scaling: expected float"):
        ta.hyper({"scaling": "big"})
    with pytest.raises(MergeflowError, match="outside"):
        ta.hyper({"scaling": -1.0})


def test_unknown_method():
    with pytest.raises(MergeflowError, match="unknown method 'nope'"):
        methods.get("nope")
