"""T-Switch against its definition (METHODS.md) and the authors' golden cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mergeflow.methods import tswitch
from mergeflow.methods.tswitch import compress, ternarize
from tests.conftest import GOLDEN


def reference(tau: torch.Tensor, drop: float):
    """The definition, with a sort (independent of the selection code under test)."""
    ternary = torch.zeros(tau.shape, dtype=torch.int8)
    for sign in (1, -1):
        v = tau * sign
        cand = v[v > 0]
        keep = int(cand.numel() * (1 - drop))
        if keep <= 0:  # too few to prune: the sign is kept whole (METHODS.md, the authors' guard)
            ternary[v > 0] = sign
        else:
            thr = torch.sort(cand, descending=True).values[keep - 1]
            ternary[(v > 0) & (v >= thr)] = sign
    kept = ternary != 0
    scale = float(tau[kept].double().norm() / kept.sum().double().sqrt()) if kept.any() else 0.0
    return ternary, scale


def test_hand_computed_case():
    tau = torch.tensor([0.9, 0.5, 0.1, 0.3, -0.8, -0.2, -0.05, 0.0, 0.5, -0.2])
    # positives 0.9 0.5 0.1 0.3 0.5 -> keep int(5*0.4)=2: 0.9 and the tie 0.5, 0.5 (3 kept)
    # negatives -0.8 -0.2 -0.05 -0.2 -> keep int(4*0.4)=1: -0.8
    ternary, scale = ternarize(tau, 0.6)
    assert ternary.tolist() == [1, 1, 0, 0, -1, 0, 0, 0, 1, 0]
    expected = ((0.9**2 + 0.5**2 + 0.5**2 + 0.8**2) / 4) ** 0.5
    assert scale == pytest.approx(expected, rel=1e-6)


def test_keep_counts_per_sign_and_three_levels():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(200, 30, generator=g)
    ternary, _ = ternarize(tau, 0.6)
    assert set(ternary.unique().tolist()) == {-1, 0, 1}
    n_pos, n_neg = int((tau > 0).sum()), int((tau < 0).sum())
    assert int((ternary == 1).sum()) == int(n_pos * 0.4)  # continuous values: no ties
    assert int((ternary == -1).sum()) == int(n_neg * 0.4)
    assert torch.equal(ternary[ternary != 0].float(), torch.sign(tau[ternary != 0]))


def test_a_sign_too_few_to_prune_is_kept_whole():
    # positives 0.3, 0.1 -> int(2*0.4) = 0: both kept; negatives -0.2, -0.05, -0.7 -> int(3*0.4) = 1: -0.7
    tau = torch.tensor([0.3, -0.2, 0.1, 0.0, -0.05, -0.7])
    ternary, scale = ternarize(tau, 0.6)
    assert ternary.tolist() == [1, 0, 1, 0, 0, -1]
    assert scale == pytest.approx(((0.09 + 0.01 + 0.49) / 3) ** 0.5, rel=1e-6)
    assert ternarize(torch.tensor([3.0]), 0.6)[0].tolist() == [1]


def test_ties_at_threshold_are_kept():
    tau = torch.tensor([0.5, 0.5, 0.5, -0.5, -0.5, 0.1, -0.1, 0.0])
    ternary, _ = ternarize(tau, 0.5)  # int(4*0.5)=2 positives wanted, three tie at 0.5
    assert ternary.tolist() == [1, 1, 1, -1, -1, 0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), drop=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), quant=st.booleans())
def test_matches_definition_and_preserves_norm(n, drop, seed, quant):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=g)
    if quant:  # many ties
        tau = torch.round(tau * 2) / 2
    ternary, scale = ternarize(tau, drop)
    ref_t, ref_s = reference(tau, drop)
    assert torch.equal(ternary, ref_t)
    assert scale == pytest.approx(ref_s, rel=1e-6, abs=1e-30)
    kept = ternary != 0
    # norm preserved: ||s * B|| == ||tau_kept||
    assert float((scale * ternary.float()).norm()) == pytest.approx(float(tau[kept].norm()), rel=1e-5, abs=1e-12)


def test_drop_zero_keeps_every_nonzero():
    tau = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, -1e-30]])
    ternary, _ = ternarize(tau, 0.0)
    assert torch.equal(ternary, torch.sign(tau).to(torch.int8))


def test_skip_rules():
    taus = [("scalar", torch.tensor(0.25)), ("zeros", torch.zeros(4, 4)), ("w", torch.tensor([1.0, -2.0, 0.5, 0.0]))]
    sw = compress(taus, drop=0.5)
    assert set(sw.dense) == {"scalar"} and float(sw.dense["scalar"]) == 0.25  # 0-dim stays dense
    assert sw.skipped == ["zeros"]  # all-zero tensors are skipped
    assert set(sw.tensors) == {"w"}
    assert torch.equal(tswitch.delta(sw, "zeros", torch.zeros(4, 4)), torch.zeros(4, 4))


def test_heads_kept_dense():
    sw = compress([("head.weight", torch.tensor([1.0, -1.0, 0.2]))], drop=0.6, keep_dense=["head.weight"])
    assert "head.weight" in sw.dense and not sw.tensors


def test_golden_cases():
    with safe_open(GOLDEN, framework="pt") as fh:
        meta = fh.metadata()
        cases = sorted({k.split(".")[0] for k in fh.keys()})
        assert cases
        for case in cases:
            tau = fh.get_tensor(f"{case}.tau")
            drop = float(meta[f"{case}.drop"])
            ternary, scale = ternarize(tau, drop)
            assert torch.equal(ternary, fh.get_tensor(f"{case}.ternary")), case
            assert scale == float(fh.get_tensor(f"{case}.scale")), case


def test_method_registry_entry_matches_ternarize():
    from mergeflow import methods

    m = methods.get("tswitch")
    assert m.dynamic and m.hyper() == {"drop": 0.6}
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(10, 10, generator=g) for _ in range(3)]
    out = m("w", torch.zeros(10, 10), taus, drop=0.6)
    for tau, d in zip(taus, out):
        t, s = ternarize(tau, 0.6)
        assert torch.equal(d, t.float() * s)


def test_drop_one_is_refused():
    """At drop 1 every keep count is 0 and the too-few guard would keep everything: refused."""
    from mergeflow import methods
    from mergeflow.errors import MergeflowError

    with pytest.raises(MergeflowError, match=r"drop: 1.0 is outside \[0.0, 1.0\)"):
        methods.get("tswitch").hyper({"drop": 1.0})
    assert methods.get("tswitch").hyper({"drop": 0.99})["drop"] == 0.99
