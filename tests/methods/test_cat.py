"""CAT Merging and the layer-input statistics it reads, against their definitions."""

from __future__ import annotations

import pytest
import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.layer_stats import InputStats, layer_input_stats
from mergeflow.merge import merge_state_dicts
from mergeflow.methods.cat import removal_basis, trim

torch.manual_seed(0)


def tiny():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))


def test_stats_are_grams_and_normalised_second_moments():
    model = tiny()
    x = torch.randn(5, 7, 4)  # 35 rows of 4 inputs
    stats = layer_input_stats(model, lambda: model(x))
    assert set(stats) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    rows = x.reshape(-1, 4).double()
    assert stats["0.weight"].kind == "linear" and stats["0.weight"].rows == 35
    torch.testing.assert_close(stats["0.weight"].value, rows.T @ rows / 35)
    h = model[0](x).reshape(-1, 6).double()
    xhat = torch.nn.functional.layer_norm(h, (6,), eps=model[1].eps)
    assert stats["1.weight"].kind == "scale"
    torch.testing.assert_close(stats["1.weight"].value, xhat.pow(2).mean(0))
    g = model[1](model[0](x)).reshape(-1, 6).double()
    torch.testing.assert_close(stats["2.weight"].value, g.T @ g / 35)
    assert stats["2.bias"].kind == "shift" and torch.equal(stats["2.bias"].value, torch.ones(3, dtype=torch.float64))
    # only the named parameters; hooks are gone afterwards
    only = layer_input_stats(model, lambda: model(x), names=["2.weight"])
    assert set(only) == {"2.weight"}
    assert not any(m._forward_pre_hooks for m in model.modules())


class Attention(torch.nn.Module):
    """q/k/v projections of one hidden state, as transformers' attention layers call them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, h):
        return self.o(self.q(h) * self.k(h) + self.v(h))


def test_projections_of_one_input_share_one_matrix():
    torch.manual_seed(2)
    model = Attention()
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]
    stats = layer_input_stats(model, lambda: [model(b) for b in batches])
    rows = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    want = rows.T @ rows / 25
    for name in ("q.weight", "k.weight", "v.weight"):
        torch.testing.assert_close(stats[name].value, want)
        assert stats[name].rows == 25
    assert stats["k.weight"].value is stats["q.weight"].value is stats["v.weight"].value  # one matrix in memory
    o_in = (
        (model.q(batches[0]) * model.k(batches[0]) + model.v(batches[0])).reshape(-1, 4).double(),
        (model.q(batches[1]) * model.k(batches[1]) + model.v(batches[1])).reshape(-1, 4).double(),
    )
    o_rows = torch.cat(o_in)
    torch.testing.assert_close(stats["o.weight"].value, o_rows.T @ o_rows / 25)


def test_stats_file_round_trip(tmp_path):
    from mergeflow.layer_stats import StatsFile, save_stats

    torch.manual_seed(3)
    model = Attention()
    stats = layer_input_stats(model, lambda: model(torch.randn(6, 4)))
    save_stats(tmp_path / "s.safetensors", stats)
    back = StatsFile(tmp_path / "s.safetensors")
    for name, st in stats.items():
        got = back.get(name)
        assert got.kind == st.kind and got.rows == st.rows and got.value.dtype == torch.float32
        torch.testing.assert_close(got.value, st.value.float())
    assert back.get("nothing.weight") is None
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MergeflowError, match=r"other.safetensors: not a layer-input statistics file"):
        StatsFile(tmp_path / "other.safetensors")


def test_rms_norm_stats():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(5, eps=1e-6)
    x = torch.randn(9, 5)
    stats = layer_input_stats(norm, lambda: norm(x))
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).pow(2).mean(0)
    assert stats["weight"].kind == "scale"
    torch.testing.assert_close(stats["weight"].value, want)


def test_no_layer_reached_is_an_error():
    with pytest.raises(MergeflowError, match="no linear or normalisation layer"):
        layer_input_stats(torch.nn.Sequential(torch.nn.ReLU()), lambda: None)


def test_scale_trim_hand_case():
    """Two tasks, c = 1, lambda = 1 (worked by hand in the comments)."""
    t1, t2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 1.0])
    s1, s2 = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 1.0])
    stats = [InputStats("scale", s1, 10), InputStats("scale", s2, 10)]
    # task 1's score: t2^2 (s1 - s2) = [4.5, 0, 0] -> dim 0 leaves t2
    # task 2's score: t1^2 (s2 - s1) = [-0.5, 4, 0] -> dim 1 leaves t1
    a, b = trim("ln.weight", [t1, t2], stats, c=1, lam=1.0)
    assert torch.equal(a, torch.tensor([1.0, 0.0, 3.0])) and torch.equal(b, torch.tensor([0.0, 0.0, 1.0]))
    cat = methods.get("cat")
    out = cat("ln.weight", torch.zeros(3), [t1, t2], **cat.hyper({"c": 1, "scaling": 1.0}), ctx=[{"ln.weight": s} for s in stats])
    assert torch.equal(out, torch.tensor([1.0, 0.0, 4.0]))


def test_shift_is_trimmed_only_below_lambda_one():
    taus = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])]
    ones = [InputStats("shift", torch.ones(2), 4)] * 2
    kept = trim("b", taus, ones, c=1, lam=1.0)  # score (1 - lambda) * ... = 0: nothing positive
    assert all(torch.equal(k, t) for k, t in zip(kept, taus))
    cut = trim("b", taus, ones, c=1, lam=0.5)  # task 0 removes task 1's largest entry (dim 1), and vice versa
    assert torch.equal(cut[0], torch.tensor([1.0, 0.0])) and torch.equal(cut[1], torch.tensor([0.5, 0.0]))


def test_removal_basis_maximises_the_objective():
    """B_k from the eigenvectors beats any other orthonormal basis of the same size on
    sum_{i != k} ||X_k tau_i^T B B^T||^2 - lambda ||X_i tau_i^T B B^T||^2."""
    torch.manual_seed(3)
    T, out, inp, c, lam = 3, 6, 5, 2, 0.5
    xs = [torch.randn(20, inp, dtype=torch.float64) for _ in range(T)]
    grams = [x.T @ x / 20 for x in xs]
    taus = [torch.randn(out, inp, dtype=torch.float64) for _ in range(T)]

    def objective(b, k):
        return sum(
            float((xs[k] @ taus[i].T @ b @ b.T).pow(2).sum() / 20 - lam * (xs[i] @ taus[i].T @ b @ b.T).pow(2).sum() / 20)
            for i in range(T)
            if i != k
        )

    for k in range(T):
        b = removal_basis(taus, grams, k, c, lam)
        assert b.shape[1] <= c
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64))
        best = objective(b, k)
        for _ in range(50):
            q, _ = torch.linalg.qr(torch.randn(out, c, dtype=torch.float64))
            assert objective(q, k) <= best + 1e-9


def test_removal_basis_of_a_wide_layer_is_the_direct_eigenvectors():
    """out > (T-1) in (an LM head): solved in the task vectors' column space, same subspace as
    the eigenvectors of the out x out matrix M_k."""
    torch.manual_seed(6)
    T, out, inp, c, lam = 3, 40, 4, 3, 0.3
    taus = [torch.randn(out, inp, dtype=torch.float64) for _ in range(T)]
    grams = [(lambda x: x.T @ x / 20)(torch.randn(20, inp, dtype=torch.float64)) for _ in range(T)]
    for k in range(T):
        b = removal_basis(taus, grams, k, c, lam)
        m = sum(taus[i] @ (grams[k] - lam * grams[i]) @ taus[i].T for i in range(T) if i != k)
        ev, vec = torch.linalg.eigh(m)
        want = vec[:, -c:][:, ev[-c:] > 1e-10 * ev.abs().max()]
        assert b.shape == want.shape
        torch.testing.assert_close(b @ b.T, want @ want.T)


def test_removal_basis_without_self_harm_is_the_others_top_directions():
    """G_i = 0 for the others: M_k = sum_{i != k} tau_i G_k tau_i^T; with G_k = I and one other
    task that is tau_i tau_i^T, whose top eigenvector is tau_i's top left singular vector."""
    torch.manual_seed(4)
    tau_k, tau_i = torch.randn(4, 3), torch.randn(4, 3)
    b = removal_basis([tau_k, tau_i], [torch.eye(3), torch.zeros(3, 3)], 0, 1, 1.0)
    u = torch.linalg.svd(tau_i).U[:, :1]
    torch.testing.assert_close((b.T @ u).abs(), torch.ones(1, 1), rtol=1e-4, atol=1e-4)


def test_linear_trim_projects_others_off_each_basis():
    torch.manual_seed(5)
    T, out, inp = 3, 8, 6
    taus = [torch.randn(out, inp) for _ in range(T)]
    stats = [InputStats("linear", (lambda x: x.T @ x / 30)(torch.randn(30, inp)), 30) for _ in range(T)]
    grams = [s.value for s in stats]
    trimmed = trim("w", taus, stats, c=2, lam=0.2)
    for k in range(T):
        b = removal_basis(taus, grams, k, 2, 0.2)
        assert b.shape[1] > 0
        # task k's own vector is never projected by its own basis; a single other projection
        # leaves tau_i orthogonal to B_k when it is the last one applied
        last = max(j for j in range(T) if j != k)
        for i in range(T):
            if i != k and k == last:
                assert float((b.T @ trimmed[i]).abs().max()) < 1e-4
    for t, tr in zip(taus, trimmed):
        assert float(tr.norm()) <= float(t.norm()) + 1e-5  # projections never lengthen
    # c = 0 or lambda so large that nothing conflicts: plain task vectors
    assert all(torch.equal(a, b) for a, b in zip(trim("w", taus, stats, c=0, lam=0.2), taus))
    assert all(torch.equal(a, b) for a, b in zip(trim("w", taus, stats, c=2, lam=1e6), taus))


def test_tensors_without_stats_are_task_arithmetic():
    cat = methods.get("cat")
    taus = [torch.randn(3, 2), torch.randn(3, 2)]
    out = cat("emb", torch.zeros(3, 2), taus, **cat.hyper({}), ctx=[{}, {}])
    torch.testing.assert_close(out, 0.3 * (taus[0] + taus[1]))


def test_engine_needs_data_and_uses_it():
    base = {k: v.detach().clone() for k, v in tiny().state_dict().items()}
    experts = []
    for s in (7, 8):
        torch.manual_seed(s)
        experts.append({k: v + 0.1 * torch.randn_like(v) for k, v in base.items()})
    cat = methods.get("cat")
    with pytest.raises(MergeflowError, match=r"^method cat needs layer-inputs statistics"):
        merge_state_dicts(cat, base, experts)
    data = []
    for e in experts:
        m = tiny()
        m.load_state_dict(e)
        data.append(layer_input_stats(m, lambda m=m: m(torch.randn(16, 4))))
    hp = {"c": 1, "tradeoff": 0.1}
    (got,) = merge_state_dicts(cat, base, experts, hp, data=data)
    ctx = data
    for name in base:
        want = base[name] + cat(name, base[name], [e[name] - base[name] for e in experts], **cat.hyper(hp), ctx=ctx)
        torch.testing.assert_close(got[name], want)
    (ta,) = merge_state_dicts(methods.get("task_arithmetic"), base, experts)
    assert not torch.allclose(got["0.weight"], ta["0.weight"])  # something was trimmed
    with pytest.raises(MergeflowError, match="statistics given for 1 tasks, 2 models"):
        merge_state_dicts(cat, base, experts, data=data[:1])


def test_cli_merge_refuses_cat_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from flows.cli import app

    base = {k: v.detach().clone().contiguous() for k, v in tiny().state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + 1 for k, v in base.items()}, str(tmp_path / "a.safetensors"))
    res = CliRunner().invoke(
        app,
        [
            "merge",
            "--method",
            "cat",
            "--base",
            str(tmp_path / "base.safetensors"),
            "--out",
            str(tmp_path / "out"),
            str(tmp_path / "a.safetensors"),
        ],
    )
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if "error" in line]
    assert len(lines) == 1 and "needs layer-inputs statistics" in lines[0]
    assert not (tmp_path / "out").exists()
