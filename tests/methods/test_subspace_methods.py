"""The SVD-based merges (TSV-M, TSV-C, Iso-C, Iso-CTS, CART) against their definitions.

References here are written from the papers (and, for the edge semantics, the authors' code)
in float64 with plain torch: the polar factor by eigen-decomposition, M (M^T M)^(-1/2), never by
the library's helpers; small cases are worked out by hand. Importing the modules registers the
methods (the lead adds them to ``mergeflow.methods``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import mergeflow.methods.cart  # noqa: F401  (registers cart)
import mergeflow.methods.iso as iso
import mergeflow.methods.tsv as tsv
from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import TaskVectors, merge_state_dicts, merge_to_disk
from mergeflow.methods import _svd

NAMES = ["tsv_m", "tsv_c", "iso_c", "iso_cts", "cart"]
DYNAMIC = {"tsv_c"}


# --------------------------------------------------------------------------- helpers


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def taus_of(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=g) for _ in range(n)]


def call(name, taus, **hp):
    m = methods.get(name)
    return m("w" if taus[0].dim() == 2 else "b", torch.zeros_like(taus[0]), taus, **m.hyper(hp))


def close(a, b, atol=1e-5, rtol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), f"max diff {(a.double() - b.double()).abs().max()}"


def polar64(m: torch.Tensor) -> torch.Tensor:
    """M (M^T M)^(-1/2) for a full-column-rank M (or its transpose for a wide one), in float64."""
    m = m.double()
    if m.shape[0] < m.shape[1]:
        return polar64(m.T).T
    w, q = torch.linalg.eigh(m.T @ m)
    return m @ (q * w.rsqrt()) @ q.T


def tsv_reference(taus, fraction=None):
    """TSV-M as the authors' code: per task k = int(r * fraction) triplets placed side by side
    in zero-filled r-column U and r-row V, then P Q^T of each."""
    t_n = len(taus)
    u0, _, _ = torch.linalg.svd(taus[0].double(), full_matrices=False)
    r = u0.shape[1]
    k = int(r * (fraction if fraction is not None else 1 / t_n))
    width = max(r, k * t_n)
    su = torch.zeros(taus[0].shape[0], width, dtype=torch.float64)
    ss = torch.zeros(width, dtype=torch.float64)
    sv = torch.zeros(width, taus[0].shape[1], dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        su[:, i * k : (i + 1) * k], ss[i * k : (i + 1) * k], sv[i * k : (i + 1) * k] = u[:, :k], s[:k], vh[:k]
    pu, _, qu = torch.linalg.svd(su, full_matrices=False)
    pv, _, qv = torch.linalg.svd(sv, full_matrices=False)
    return (pu @ qu) @ torch.diag(ss) @ (pv @ qv)


def iso_cts_reference(taus, common_fraction):
    """Iso-CTS as written in the paper (Algorithm 1) with the authors' split of the rank."""
    t_n, shape = len(taus), taus[0].shape
    r = min(shape)
    k = int(r * common_fraction)
    s_per = round((r - k) / t_n)
    k = r - s_per * t_n
    u, s, vh = torch.linalg.svd(sum(t.double() for t in taus), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k]]
    for tau in taus:
        proj = tau.double() - u[:, :k] @ u[:, :k].T @ tau.double()
        ut, st, vt = torch.linalg.svd(proj, full_matrices=False)
        us.append(ut[:, :s_per]), ss.append(st[:s_per]), vs.append(vt[:s_per])
    ustar, vstar = torch.cat(us, 1), torch.cat(vs, 0)
    pu, _, qu = torch.linalg.svd(ustar, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vstar, full_matrices=False)
    return torch.cat(ss).mean() * (pu @ qu) @ (pv @ qv)


def low_rank64(x, k):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


# --------------------------------------------------------------------------- shared helpers


def test_is_matrix_and_polar_factor():
    assert _svd.is_matrix("w", torch.zeros(3, 2)) and not _svd.is_matrix("b", torch.zeros(3))
    assert not _svd.is_matrix("c", torch.zeros(2, 3, 4)) and not _svd.is_matrix("i", torch.zeros(3, 2, dtype=torch.int64))
    for shape in [(7, 4), (4, 7)]:
        m = rand(*shape, seed=3)
        p = _svd.orthogonalise(m)
        close(p, polar64(m), atol=1e-5)
        small = min(shape)
        gram = p.T @ p if shape[0] > shape[1] else p @ p.T
        close(gram, torch.eye(small), atol=1e-5)
    # hand case: the polar factor of diag(2, 3) is the identity, of [[0, 2], [-1, 0]] a rotation
    assert torch.allclose(_svd.orthogonalise(torch.diag(torch.tensor([2.0, 3.0]))), torch.eye(2), atol=1e-6)
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert torch.allclose(_svd.orthogonalise(rotation * torch.tensor([2.0, 1.0])), rotation, atol=1e-6)


def test_counts():
    assert _svd.keep_count(0.29, 100) == 29 and _svd.keep_count(0.0, 10) == 1 and _svd.keep_count(1.0, 10) == 10
    assert _svd.ceil_count(0.08, 100) == 8 and _svd.ceil_count(0.08, 768) == 62 and _svd.ceil_count(0.0, 5) == 0
    assert tsv.per_task_rank(None, 768, 8) == 96 and tsv.per_task_rank(None, 5, 8) == 1 and tsv.per_task_rank(0.5, 7, 3) == 3
    assert iso.split(768, 8, 0.8) == (616, 19)  # int(614.4) = 614; round(154 / 8) = 19; 768 - 152
    assert iso.split(9, 3, 0.8) == (6, 1) and iso.split(10, 3, 1.0) == (10, 0) and iso.split(2, 3, 0.0) == (2, 0)


# --------------------------------------------------------------------------- TSV-M


def test_tsv_m_one_task_full_fraction_is_the_task_vector():
    tau = rand(7, 5, seed=1)
    close(call("tsv_m", [tau], fraction=1.0), tau)
    close(call("tsv_m", [tau]), tau)  # fraction 1/T = 1


def test_tsv_m_disjoint_supports_give_the_sum():
    """Tasks on disjoint row and column blocks have orthogonal singular vectors: nothing to
    decorrelate, so keeping each task's whole rank returns Task Arithmetic's sum."""
    taus = []
    for i in range(3):
        tau = torch.zeros(6, 6)
        tau[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = rand(2, 2, seed=10 + i)
        taus.append(tau)
    close(call("tsv_m", taus), sum(taus))  # k = 6 // 3 = 2 = each task's rank
    close(call("tsv_m", taus, fraction=1.0), sum(taus))  # kT = 18 > r: the rank-2 tasks' null triplets are dropped
    close(call("tsv_m", taus, scaling=0.5), 0.5 * sum(taus))


def test_tsv_m_rank_one_tasks_by_hand():
    """Two rank-1 tasks s_t a_t b_t^T with a_1 = e1, a_2 = e2 (orthogonal) and b_1, b_2 at 60
    degrees (c = cos = 1/2). U = [a_1 a_2] is already orthogonal; V = [b_1 b_2] has Gram
    [[1, c], [c, 1]], whose inverse square root is 1/2 [[x+y, x-y], [x-y, x+y]] with
    x = (1+c)^(-1/2), y = (1-c)^(-1/2); so q_1 = ((x+y) b_1 + (x-y) b_2) / 2, q_2 likewise,
    and TSV-M = s_1 a_1 q_1^T + s_2 a_2 q_2^T."""
    e = torch.eye(4)
    b1, b2 = e[0], 0.5 * e[0] + math.sqrt(3) / 2 * e[1]
    s1, s2 = 3.0, 2.0
    taus = [s1 * torch.outer(e[0], b1), s2 * torch.outer(e[1], b2)]
    x, y = (1.5) ** -0.5, (0.5) ** -0.5
    q1 = ((x + y) * b1 + (x - y) * b2) / 2
    q2 = ((x - y) * b1 + (x + y) * b2) / 2
    assert abs(float(q1 @ q2)) < 1e-6 and abs(float(q1 @ q1) - 1) < 1e-6
    want = s1 * torch.outer(e[0], q1) + s2 * torch.outer(e[1], q2)
    close(call("tsv_m", taus), want)  # fraction 1/2: k = 2, the second triplet of each is null
    close(call("tsv_m", taus, fraction=0.25), want)  # k = 1


@pytest.mark.parametrize("shape, n, fraction", [((12, 9), 3, None), ((9, 12), 4, None), ((10, 10), 2, 0.3), ((8, 6), 3, 1.0)])
def test_tsv_m_matches_the_authors_algorithm(shape, n, fraction):
    taus = taus_of(n, shape, seed=4)
    close(call("tsv_m", taus, fraction=fraction), tsv_reference(taus, fraction), atol=1e-4)


def test_tsv_m_zero_layer_stays_zero():
    out = call("tsv_m", [torch.zeros(5, 4), torch.zeros(5, 4)])
    assert torch.equal(out, torch.zeros(5, 4))


# --------------------------------------------------------------------------- TSV-C


def test_tsv_c_full_rank_is_identity():
    taus = taus_of(3, (6, 5), seed=5)
    for got, tau in zip(call("tsv_c", taus, fraction=1.0), taus):
        close(got, tau)


def test_tsv_c_eckart_young():
    taus = taus_of(4, (10, 8), seed=6)
    for fraction, k in [(None, 2), (0.5, 4), (0.3, 2), (0.0, 1)]:  # None: 8 // 4
        out = call("tsv_c", taus, fraction=fraction)
        assert len(out) == 4
        for got, tau in zip(out, taus):
            s = torch.linalg.svdvals(tau.double())
            assert int(torch.linalg.matrix_rank(got)) == k
            err = torch.linalg.matrix_norm(tau.double() - got.double()) ** 2
            assert math.isclose(float(err), float((s[k:] ** 2).sum()), rel_tol=1e-4, abs_tol=1e-6)
            close(got, low_rank64(tau, k), atol=1e-5)


def test_tsv_c_storage():
    # hand case: T = 2, default fraction 1/2: w (6 x 4) keeps k = 2: 2 * (6 + 4 + 1) = 22 numbers; b whole: 4
    assert tsv.tsv_c_storage_bytes({"w": (6, 4), "b": (4,)}, 2) == 2 * (22 + 4) * 4
    assert tsv.tsv_c_storage_bytes({"w": (6, 4), "s": ()}, 1, fraction=0.5) == (2 * 11 + 1) * 4
    m = methods.get("tsv_c")
    assert m.storage_bytes(1000, 8, 4) == 8000 and m.storage_bytes(1000, 1, 2) == 2000  # estimates
    shapes = {"w": (6, 4), "b": (4,)}
    assert m.storage_bytes(28, 2, 2, shapes=shapes) == 2 * (22 + 4) * 4  # exact, float32 factors
    assert m.storage_bytes(28, 2, 2, hp={"fraction": 1.0}, shapes=shapes) == 2 * (4 * 11 + 4) * 4


# --------------------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_flat_spectrum_same_subspaces():
    taus = taus_of(3, (9, 6), seed=7)
    total = sum(t.double() for t in taus)
    sv = torch.linalg.svdvals(total)
    out = call("iso_c", taus, scaling=1.0)
    close(torch.linalg.svdvals(out.double()), torch.full((6,), float(sv.mean()), dtype=torch.float64))
    close(out, sv.mean() * polar64(total))  # sigma_bar U V^T is sigma_bar times the polar factor of the sum
    close(call("iso_c", taus, scaling=0.4), 0.4 * out)


def test_iso_c_rank_deficient_sum():
    """Two rank-1 tasks: the sum has rank 2; its two directions get the mean of all r = 4
    singular values, (s_1 + s_2) / 4, the null directions none."""
    a, b = rand(5, 2, seed=8), rand(2, 4, seed=9)
    taus = [torch.outer(a[:, 0], b[0]), torch.outer(a[:, 1], b[1])]
    total = (taus[0] + taus[1]).double()
    sv = torch.linalg.svdvals(total)
    out = call("iso_c", taus, scaling=1.0).double()
    got = torch.linalg.svdvals(out)
    mean = float(sv.sum() / 4)
    close(got, torch.tensor([mean, mean, 0.0, 0.0], dtype=torch.float64), atol=1e-5)
    u, _, vh = torch.linalg.svd(total)
    close(out, mean * u[:, :2] @ vh[:2])


def test_iso_cts_with_full_common_subspace_is_iso_c():
    taus = taus_of(4, (10, 8), seed=10)
    close(call("iso_cts", taus, common_fraction=1.0, scaling=1.3), call("iso_c", taus, scaling=1.3), atol=1e-5)


def test_iso_cts_one_task_is_iso_c():
    """T = 1: the task-specific directions of tau off its own top-k are its remaining ones."""
    tau = rand(9, 7, seed=11)
    close(call("iso_cts", [tau], common_fraction=0.5), call("iso_c", [tau]), atol=1e-5)


@pytest.mark.parametrize("shape, n, cf", [((12, 9), 3, 0.8), ((9, 12), 2, 0.5), ((16, 16), 4, 0.75)])
def test_iso_cts_matches_the_paper(shape, n, cf):
    taus = taus_of(n, shape, seed=12)
    out = call("iso_cts", taus, common_fraction=cf, scaling=1.0)
    close(out, iso_cts_reference(taus, cf), atol=1e-4)
    # isotropic: r equal singular values
    sv = torch.linalg.svdvals(out.double())
    close(sv, torch.full_like(sv, float(sv.mean())), atol=1e-4)


# --------------------------------------------------------------------------- CART


def test_cart_full_rank_is_weight_averaging_and_one_task_is_theta_1():
    taus = taus_of(3, (6, 5), seed=13)
    avg = sum(taus) / 3
    close(call("cart", taus, rank_ratio=1.0, scaling=2.0), avg)  # the centred vectors sum to zero
    close(call("cart", taus, rank_ratio=0.0, scaling=2.0), avg)
    tau = rand(6, 5, seed=14)
    close(call("cart", [tau]), tau)
    close(call("cart", [tau], rank_ratio=1.0), tau)


def test_cart_formula():
    taus = taus_of(4, (20, 12), seed=15)
    avg = sum(t.double() for t in taus) / 4
    for ratio, k in [(0.08, 1), (0.25, 3), (0.5, 6)]:  # ceil(0.96) = 1, ceil(3) = 3, ceil(6) = 6
        want = avg + 0.7 * sum(low_rank64(t.double() - avg, k) for t in taus)
        close(call("cart", taus, rank_ratio=ratio, scaling=0.7), want, atol=1e-5)


def test_cart_hand_case():
    """Diagonal 2 x 2 tasks, k = ceil(0.5 * 2) = 1 (the rank-1 part of a diagonal matrix keeps
    its entry of largest magnitude). Two tasks diag(3, 1), diag(1, 1): avg diag(2, 1), centred
    diag(1, 0) and diag(-1, 0) cancel -> diag(2, 1). Three tasks diag(3, 0), diag(0, 3),
    diag(0, 1.5): avg diag(1, 1.5); centred diag(2, -1.5), diag(-1, 1.5), diag(-1, 0); rank-1
    parts diag(2, 0), diag(0, 1.5), diag(-1, 0), sum diag(1, 1.5) -> diag(2, 3) at scaling 1,
    diag(1.5, 2.25) at 0.5."""
    d = torch.diag
    taus = [d(torch.tensor([3.0, 1.0])), d(torch.tensor([1.0, 1.0]))]
    close(call("cart", taus, rank_ratio=0.5, scaling=1.0), d(torch.tensor([2.0, 1.0])))
    taus = [d(torch.tensor([3.0, 0.0])), d(torch.tensor([0.0, 3.0])), d(torch.tensor([0.0, 1.5]))]
    close(call("cart", taus, rank_ratio=0.5, scaling=1.0), d(torch.tensor([2.0, 3.0])))
    close(call("cart", taus, rank_ratio=0.5, scaling=0.5), d(torch.tensor([1.5, 2.25])))


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", NAMES)
def test_non_matrix_tensors_are_averaged(name):
    for shape in [(5,), (), (2, 3, 4)]:
        taus = taus_of(3, shape, seed=16)
        avg = sum(taus) / 3
        out = call(name, taus)
        if name in DYNAMIC:  # TSV-C keeps them whole per task
            for got, tau in zip(out, taus):
                assert torch.equal(got, tau)
        else:
            close(out, avg)
    if name not in DYNAMIC and "scaling" in methods.get(name).params and name != "cart":
        taus = taus_of(2, (4,), seed=17)
        close(call(name, taus, scaling=0.5), 0.25 * (taus[0] + taus[1]))


@pytest.mark.parametrize(
    "name, key, value, words",
    [
        ("tsv_m", "fraction", 1.5, "outside"),
        ("tsv_m", "fraction", -0.1, "outside"),
        ("tsv_m", "fraction", "half", "expected float"),
        ("tsv_m", "scaling", -1.0, "outside"),
        ("tsv_c", "fraction", 2.0, "outside"),
        ("iso_c", "scaling", 11.0, "outside"),
        ("iso_cts", "common_fraction", 1.5, "outside"),
        ("iso_cts", "common_fraction", -0.5, "outside"),
        ("iso_cts", "scaling", -0.1, "outside"),
        ("cart", "rank_ratio", 1.2, "outside"),
        ("cart", "scaling", -2.0, "outside"),
        ("cart", "rank", 0.1, "unknown hyper-parameter"),
    ],
)
def test_hyper_parameter_checks(name, key, value, words):
    with pytest.raises(MergeflowError, match=rf"^{key}: .*{words}"):
        methods.get(name).hyper({key: value})


def test_defaults_and_references():
    assert methods.get("tsv_m").hyper() == {"fraction": None, "scaling": 1.0}
    assert methods.get("tsv_m").hyper({"fraction": 1}) == {"fraction": 1.0, "scaling": 1.0}
    assert methods.get("tsv_c").hyper() == {"fraction": None} and methods.get("tsv_c").dynamic
    assert methods.get("iso_c").hyper() == {"scaling": 1.0}
    assert methods.get("iso_cts").hyper() == {"common_fraction": 0.8, "scaling": 1.0}
    assert methods.get("cart").hyper() == {"rank_ratio": 0.08, "scaling": 1.0}
    for name in NAMES:
        m = methods.get(name)
        assert m.reference and m.summary and not (m.dynamic ^ (name in DYNAMIC))


# --------------------------------------------------------------------------- through the engine


def _models(n=3):
    g = torch.Generator().manual_seed(20)
    base = {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.q.weight": torch.randn(8, 8, generator=g),
        "layers.0.norm.weight": torch.ones(8),
        "scale": torch.tensor(0.5),
        "position_ids": torch.arange(16),
    }
    fts = [
        {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(n)
    ]
    return base, fts


@pytest.mark.parametrize("name", NAMES)
def test_engine_runs_each_method(name):
    base, fts = _models()
    m = methods.get(name)
    out = merge_state_dicts(m, base, fts, {})
    assert len(out) == (3 if m.dynamic else 1)
    for k, v in base.items():
        if not v.is_floating_point():
            assert all(torch.equal(o[k], v) for o in out)
            continue
        taus = [f[k] - v for f in fts]
        want = m(k, v, taus, **m.hyper())
        want = want if m.dynamic else [want]
        for o, w in zip(out, want):
            close(o[k], v + w, atol=1e-6)


def _save(path, sd):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "pico"}))
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("name", ["tsv_m", "tsv_c"])
def test_engine_on_disk(name, tmp_path):
    base, fts = _models(2)
    ck = Checkpoint(_save(tmp_path / "base", base))
    sources = [TaskVectors.from_model(ck, _save(tmp_path / f"ft{i}", f)) for i, f in enumerate(fts)]
    m = methods.get(name)
    paths = merge_to_disk(m, ck, sources, {"fraction": 0.5}, tmp_path / "out")
    in_memory = merge_state_dicts(m, base, fts, {"fraction": 0.5})
    dirs = paths if m.dynamic else [tmp_path / "out"]
    assert len(dirs) == len(in_memory) == (2 if m.dynamic else 1)
    for d, sd in zip(dirs, in_memory):
        got = Checkpoint(d).state_dict()
        for k, v in sd.items():
            assert torch.equal(got[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    base, fts = _models()
    m = methods.get(name)
    cpu = merge_state_dicts(m, base, fts, {}, device="cpu")
    gpu = merge_state_dicts(m, base, fts, {}, device="cuda")
    for a, g in zip(cpu, gpu):
        for k in a:
            assert torch.allclose(a[k].float(), g[k].float().cpu(), rtol=1e-4, atol=1e-5), (name, k)
    taus = taus_of(4, (24, 16), seed=21)
    hp = m.hyper()
    a = m("w", None, taus, **hp)
    g = m("w", None, [t.cuda() for t in taus], **hp)
    for x, y in zip(a if m.dynamic else [a], g if m.dynamic else [g]):
        assert y.device.type == "cuda"
        assert torch.allclose(x, y.cpu(), rtol=1e-4, atol=1e-4), name
