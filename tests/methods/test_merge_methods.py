"""Every merging method against its definition in shared/METHODS.md ("Static merges",
"Dynamic merges", and T-Switch), through the public ``merge_state_dicts`` API.

Expectations are computed here from the definitions, with plain torch (sort-based top-k with
ties kept, as the project decided), never by calling the library's own helpers; every method
also has at least one tiny case whose numbers were worked out by hand.

Project semantics used where METHODS.md leaves room (see the module docstrings too):
- a trim keeps int(density * numel) entries per tensor by magnitude, and every entry tied at
  the threshold is kept (so more than k may survive);
- TIES: gamma = sign(sum of trimmed), disjoint mean over entries with sign == gamma (gamma 0 -> 0);
  ``scope: global``: one threshold per task over all floating tensors, k = int(density * total);
- DARE: seeded per (seed, tensor name, task index), survivors divided by (1 - drop);
- TALL: m_t = |tau_t| >= lambda_t |tau_MTL - tau_t|, task model theta_0 + scaling m_t tau_MTL;
- consensus: theta_0 + scaling [#{t: m_t} >= k] tau_MTL (scaling None -> 0.3 TA, 1.0 TIES);
- EMR ``rescale: mean``: lambda_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t tau_uni|;
  ``global``: the same with sums over all entries;
- breadcrumbs: keep topk(|tau|, n - int(beta n)) minus topk(|tau|, int(gamma n)), then TA.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.merge import merge_state_dicts

# The properties every method shares (shapes, dtypes, inputs unchanged, ranges) are checked for
# every registered method in tests/methods/test_contract.py; this file checks definitions.


# --------------------------------------------------------------------------- helpers


def run(name, base, models, /, **hp):
    """Merged state dicts (a list) of ``name`` with hyper-parameters ``hp``."""
    return merge_state_dicts(methods.get(name), base, models, hp)


def one(name, base, models, /, **hp):
    out = run(name, base, models, **hp)
    assert len(out) == 1
    return out[0]


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def models_from(base, taus):
    """Fine-tuned state dicts theta_t = theta_0 + tau_t (taus: list of dicts name -> tensor)."""
    return [{k: (base[k] + tau[k]) if k in tau else base[k].clone() for k in base} for tau in taus]


def taus_of(base, models):
    """tau_t = theta_t - theta_0 in float32, per floating tensor (what the engine computes)."""
    return [{k: m[k].float() - base[k].float() for k in base if base[k].is_floating_point()} for m in models]


def random_model(seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (6, 5), "b": (7,), "s": (), "c": (2, 3, 4)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def random_models(base, n, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def close(a, b, atol=1e-5, rtol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), f"\n{a}\n!=\n{b}"


# Reference implementations, from METHODS.md and the project's tie rules (sort based).


def ref_topk(mag, k):
    """mag >= (k-th largest of mag): ties kept; k <= 0 -> none, k >= n -> all."""
    n = mag.numel()
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    thr = mag.reshape(-1).sort(descending=True).values[k - 1]
    return mag >= thr


def ref_trim(tau, density):
    return tau * ref_topk(tau.abs(), int(density * tau.numel()))


def ref_disjoint(trimmed):
    st = torch.stack(list(trimmed))
    gamma = torch.sign(st.sum(0))
    agree = (st * gamma) > 0
    return (st * agree).sum(0) / agree.sum(0).clamp(min=1)


def ref_mtl(taus, base, density):
    if base == "ties":
        return ref_disjoint([ref_trim(x, density) for x in taus])
    return torch.stack(taus).sum(0)


def ref_tall_masks(taus, mtl, lams):
    return [x.abs() >= lam * (mtl - x).abs() for x, lam in zip(taus, lams)]


def ref_breadcrumbs_mask(tau, beta, gamma):
    n, mag = tau.numel(), tau.abs()
    return ref_topk(mag, n - int(beta * n)) & ~ref_topk(mag, int(gamma * n))


def ref_emr(taus_by_name, mode):
    """{name: [task model delta per task]} by METHODS.md's EMR definition."""
    names = list(taus_by_name)
    n_tasks = len(taus_by_name[names[0]])
    uni, masks = {}, {}
    for k in names:
        st = torch.stack(taus_by_name[k])
        sigma = torch.sign(st.sum(0))
        agree = st * sigma > 0
        uni[k] = sigma * (st.abs() * agree).amax(0)
        masks[k] = list(agree)
    lam = []
    for i in range(n_tasks):
        if mode == "mean":
            num = sum(float(taus_by_name[k][i].abs().mean()) for k in names)
            den = sum(float((masks[k][i] * uni[k]).abs().mean()) for k in names)
        else:
            num = sum(float(taus_by_name[k][i].abs().double().sum()) for k in names)
            den = sum(float((masks[k][i] * uni[k]).abs().double().sum()) for k in names)
        lam.append(num / den if den > 0 else 0.0)
    return {k: [lam[i] * masks[k][i] * uni[k] for i in range(n_tasks)] for k in names}, lam


def ref_tswitch(tau, drop):
    if tau.dim() == 0 or not bool(tau.any()):
        return tau.clone()
    b = torch.zeros_like(tau)
    for sign in (1.0, -1.0):
        v = tau * sign
        pos = v > 0
        keep = int(int(pos.sum()) * (1 - drop))
        if keep <= 0:  # too few to prune: kept whole (METHODS.md)
            b[pos] = sign
            continue
        thr = v[pos].sort(descending=True).values[keep - 1]
        b[pos & (v >= thr)] = sign
    kept = b != 0
    s = float(tau[kept].double().norm() / math.sqrt(int(kept.sum()))) if bool(kept.any()) else 0.0
    return s * b


# --------------------------------------------------------------------------- registry


# --------------------------------------------------------------------------- weight averaging


def test_weight_average_hand():
    base = {"w": t(10.0, 10.0)}
    out = one("weight_average", base, [{"w": t(11.0, 12.0)}, {"w": t(13.0, 6.0)}])
    assert out["w"].tolist() == [12.0, 9.0]


def test_weight_average_is_mean_of_models():
    base = random_model(0)
    models = random_models(base, 3)
    out = one("weight_average", base, models)
    for k in base:
        close(out[k], torch.stack([m[k] for m in models]).mean(0))


# --------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_hand():
    base = {"w": t(1.0, 1.0, 1.0)}
    models = models_from(base, [{"w": t(1.0, -2.0, 0.0)}, {"w": t(3.0, 0.5, -1.0)}])
    out = one("task_arithmetic", base, models, scaling=0.5)
    assert out["w"].tolist() == [3.0, 0.25, 0.5]


def test_task_arithmetic_random():
    base = random_model(1)
    models = random_models(base, 3, seed=2)
    taus = taus_of(base, models)
    out = one("task_arithmetic", base, models, scaling=0.7)
    for k in base:
        close(out[k], base[k] + 0.7 * sum(x[k] for x in taus))


# --------------------------------------------------------------------------- TIES


def test_ties_hand():
    # k = int(0.4 * 5) = 2 per task.
    # tau1 = [3,-1,.5,2,-4]   -> trimmed [3,0,0,0,-4]
    # tau2 = [2,1,3,.5,-1]    -> trimmed [2,0,3,0,0]
    # tau3 = [1,-.5,-2,-3,.2] -> trimmed [0,0,-2,-3,0]
    # sum [5,0,1,-3,-4] -> gamma [+,0,+,-,-]; disjoint mean [2.5,0,3,-3,-4]; * 0.5
    base = {"w": torch.zeros(5)}
    models = models_from(base, [{"w": t(3, -1, 0.5, 2, -4)}, {"w": t(2, 1, 3, 0.5, -1)}, {"w": t(1, -0.5, -2, -3, 0.2)}])
    out = one("ties", base, models, density=0.4, scaling=0.5)
    assert out["w"].tolist() == [1.25, 0.0, 1.5, -1.5, -2.0]


def test_ties_zero_elected_sign_gives_zero():
    # entry 0: trimmed 2 and -2 sum to 0 -> gamma 0 -> 0, not the mean of either side
    base = {"w": torch.zeros(3)}
    models = models_from(base, [{"w": t(2, 1, 0)}, {"w": t(-2, 1, 0)}])
    out = one("ties", base, models, density=1.0, scaling=1.0)
    assert out["w"].tolist() == [0.0, 1.0, 0.0]


def test_ties_threshold_ties_all_kept():
    # k = int(0.4 * 5) = 2; the 2nd largest magnitude is 1, shared by three entries: all kept
    base = {"w": torch.zeros(5)}
    models = models_from(base, [{"w": t(1, -1, 1, 0.5, 2)}])
    out = one("ties", base, models, density=0.4, scaling=1.0)
    assert out["w"].tolist() == [1.0, -1.0, 1.0, 0.0, 2.0]


def test_ties_single_model_is_trimmed_task_arithmetic():
    base = random_model(7)
    model = random_models(base, 1, seed=8)
    (tau,) = taus_of(base, model)
    out = one("ties", base, model, density=0.3, scaling=0.8)
    trimmed = [{k: base[k] + ref_trim(tau[k], 0.3) for k in base}]
    ta = one("task_arithmetic", base, trimmed, scaling=0.8)
    for k in base:
        close(out[k], ta[k])
        close(out[k], base[k] + 0.8 * ref_trim(tau[k], 0.3))


def test_ties_density_one_same_signs_is_mean_of_task_vectors():
    base = random_model(9)
    g = torch.Generator().manual_seed(10)
    signs = {k: torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0) for k, v in base.items()}
    taus = [{k: signs[k] * (0.1 + torch.rand(v.shape, generator=g)) for k, v in base.items()} for _ in range(4)]
    models = models_from(base, taus)
    real = taus_of(base, models)
    out = one("ties", base, models, density=1.0, scaling=1.0)
    for k in base:
        close(out[k], base[k] + torch.stack([x[k] for x in real]).mean(0))


@pytest.mark.parametrize("density,scaling", [(0.2, 1.0), (0.5, 0.6), (1.0, 1.3), (0.0, 1.0)])
def test_ties_random_against_definition(density, scaling):
    base = random_model(11)
    models = random_models(base, 3, seed=12)
    taus = taus_of(base, models)
    out = one("ties", base, models, density=density, scaling=scaling)
    for k in base:
        want = scaling * ref_disjoint([ref_trim(x[k], density) for x in taus])
        close(out[k], base[k] + want)


def _global_expected(taus, density):
    """Per task, the top int(density * total) magnitudes over the concatenated floating tensors."""
    out = []
    for tau in taus:
        flat = torch.cat([v.reshape(-1) for v in tau.values()]).abs()
        k = int(density * flat.numel())
        thr = flat.sort(descending=True).values[k - 1] if k > 0 else float("inf")
        out.append({n: v * (v.abs() >= thr) for n, v in tau.items()})
    return out


def test_ties_global_scope_hand():
    # floating entries: 4 + 6 = 10 (the int64 tensor does not count); k = int(0.4 * 10) = 4
    # concatenated magnitudes sorted: 10, 9, 8, 7, 0.6, ... -> threshold 7: all of "big", none of "small"
    # per tensor: big keeps int(1.6) = 1 entry (10), small keeps int(2.4) = 2 entries (-0.6, 0.4)
    base = {"big": torch.zeros(4), "small": torch.zeros(6), "ids": torch.arange(10)}
    tau = {"big": t(10, -9, 8, 7), "small": t(0.1, -0.2, 0.3, 0.4, 0.05, -0.6)}
    models = models_from(base, [tau])
    g = one("ties", base, models, density=0.4, scaling=1.0, scope="global")
    p = one("ties", base, models, density=0.4, scaling=1.0, scope="tensor")
    assert g["big"].tolist() == [10.0, -9.0, 8.0, 7.0]
    assert g["small"].tolist() == [0.0] * 6
    assert p["big"].tolist() == [10.0, 0.0, 0.0, 0.0]
    assert p["small"].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.4, 0.0, -0.6])
    assert torch.equal(g["ids"], base["ids"])


def test_ties_global_scope_differs_from_tensor_scope_and_matches_sort():
    g = torch.Generator().manual_seed(13)
    base = {
        "a": torch.randn(8, 6, generator=g),
        "b": torch.randn(20, generator=g),
        "s": torch.randn((), generator=g),
        "ids": torch.arange(12),
    }
    scales = {"a": 5.0, "b": 0.2, "s": 1.0}  # tensors of very different magnitudes
    taus_in = [{k: s * torch.randn(base[k].shape, generator=g) for k, s in scales.items()} for _ in range(3)]
    models = models_from(base, taus_in)
    taus = taus_of(base, models)
    density, scaling = 0.25, 0.9
    got_g = one("ties", base, models, density=density, scaling=scaling, scope="global")
    got_t = one("ties", base, models, density=density, scaling=scaling, scope="tensor")
    trimmed = _global_expected(taus, density)
    for k in scales:
        close(got_g[k], base[k] + scaling * ref_disjoint([x[k] for x in trimmed]))
        close(got_t[k], base[k] + scaling * ref_disjoint([ref_trim(x[k], density) for x in taus]))
    assert not torch.allclose(got_g["a"], got_t["a"]) and not torch.allclose(got_g["b"], got_t["b"])
    assert torch.equal(got_g["ids"], base["ids"])


def test_ties_global_scope_density_one_keeps_all():
    base = random_model(14)
    models = random_models(base, 2, seed=15)
    a = one("ties", base, models, density=1.0, scope="global")
    b = one("ties", base, models, density=1.0, scope="tensor")
    for k in base:
        close(a[k], b[k])


# --------------------------------------------------------------------------- DARE


def _dare_keep_masks(base, n_tasks, drop, seed):
    """Recover each task's keep mask from a Task Arithmetic DARE run on tau_t = 2^t (per entry,
    the merged value times (1-drop) is sum_t keep_t 2^t). Masks depend only on (seed, name, index)."""
    taus = [{k: torch.full(v.shape, float(2**i)) for k, v in base.items() if v.is_floating_point()} for i in range(n_tasks)]
    out = one("dare", base, models_from(base, taus), drop=drop, merge="task_arithmetic", scaling=1.0, seed=seed)
    masks = []
    for i in range(n_tasks):
        masks.append({k: ((torch.round((out[k] - base[k]) * (1 - drop)).long() >> i) & 1).bool() for k in taus[0]})
    return masks


def test_dare_hand_values():
    # drop 0.5: survivors doubled. tau1 = 1, tau2 = 3 -> each entry in {0, 2, 6, 8} (TA, scaling 1)
    base = {"w": torch.zeros(64)}
    models = models_from(base, [{"w": torch.ones(64)}, {"w": torch.full((64,), 3.0)}])
    out = one("dare", base, models, drop=0.5, merge="task_arithmetic", scaling=1.0, seed=3)
    assert set(out["w"].tolist()) <= {0.0, 2.0, 6.0, 8.0}
    assert len(set(out["w"].tolist())) > 1
    # TIES on the same masks with tau2 = -3: both kept -> gamma = sign(2 - 6) = -, mean -6;
    # only tau1 -> 2; only tau2 -> -6; none -> 0
    k1 = torch.isin(out["w"], t(2.0, 8.0))
    k2 = torch.isin(out["w"], t(6.0, 8.0))
    models_t = models_from(base, [{"w": torch.ones(64)}, {"w": torch.full((64,), -3.0)}])
    out_t = one("dare", base, models_t, drop=0.5, merge="ties", scaling=1.0, seed=3)
    want = torch.where(k2, -6.0, torch.where(k1, 2.0, 0.0))
    assert torch.equal(out_t["w"], want)


@pytest.mark.parametrize("density,scaling", [(0.5, 1.0), (1.0, 0.7)])
def test_dare_ties_base_against_definition(density, scaling):
    base = random_model(16)
    drop, seed = 0.4, 21
    masks = _dare_keep_masks(base, 3, drop, seed)
    models = random_models(base, 3, seed=17)
    taus = taus_of(base, models)
    out = one("dare", base, models, drop=drop, merge="ties", scaling=scaling, density=density, seed=seed)
    ta = one("dare", base, models, drop=drop, merge="task_arithmetic", scaling=scaling, seed=seed)
    for k in masks[0]:
        rescaled = [x[k] * m[k] / (1 - drop) for x, m in zip(taus, masks)]
        close(out[k], base[k] + scaling * ref_disjoint([ref_trim(r, density) for r in rescaled]))
        close(ta[k], base[k] + scaling * torch.stack(rescaled).sum(0))


def test_dare_drop_zero_equals_task_arithmetic():
    base = random_model(18)
    models = random_models(base, 3, seed=19)
    a = one("dare", base, models, drop=0.0, merge="task_arithmetic", scaling=0.45, seed=5)
    b = one("task_arithmetic", base, models, scaling=0.45)
    for k in base:
        close(a[k], b[k])


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_dare_drop_zero_equals_ties(density):
    base = random_model(20)
    models = random_models(base, 3, seed=21)
    a = one("dare", base, models, drop=0.0, merge="ties", scaling=1.1, density=density, seed=5)
    b = one("ties", base, models, scaling=1.1, density=density)
    for k in base:
        close(a[k], b[k])


def test_dare_reproducible_and_seed_dependent():
    base = random_model(22, {"w": (30, 20), "b": (50,)})
    models = random_models(base, 2, seed=23)
    hp = dict(drop=0.5, merge="task_arithmetic", scaling=1.0)
    a = one("dare", base, models, seed=7, **hp)
    b = one("dare", base, models, seed=7, **hp)
    c = one("dare", base, models, seed=8, **hp)
    for k in base:
        assert torch.equal(a[k], b[k])
        assert not torch.equal(a[k], c[k])


def test_dare_masks_differ_per_task_and_per_tensor_name():
    base = {"x": torch.zeros(400), "y": torch.zeros(400)}
    masks = _dare_keep_masks(base, 2, 0.5, 0)
    assert not torch.equal(masks[0]["x"], masks[1]["x"])  # per task index
    assert not torch.equal(masks[0]["x"], masks[0]["y"])  # per tensor name


def test_dare_mask_independent_of_values():
    # seeded per (seed, name, task index): the same entries survive whatever the task vector holds
    base = {"w": torch.zeros(200)}
    g = torch.Generator().manual_seed(24)
    tau = torch.randn(200, generator=g)
    a = one("dare", base, models_from(base, [{"w": torch.ones(200)}]), drop=0.6, scaling=1.0, seed=2)
    b = one("dare", base, models_from(base, [{"w": tau}]), drop=0.6, scaling=1.0, seed=2)
    assert torch.equal(a["w"] != 0, b["w"] != 0)


@pytest.mark.parametrize("drop", [0.1, 0.5, 0.9])
def test_dare_survivors_rescaled_and_drop_rate(drop):
    n = 100_000
    base = {"w": torch.zeros(n)}
    g = torch.Generator().manual_seed(25)
    tau = torch.randn(n, generator=g).sign() * (0.5 + torch.rand(n, generator=g))  # no zeros
    out = one("dare", base, models_from(base, [{"w": tau}]), drop=drop, merge="task_arithmetic", scaling=1.0, seed=1)["w"]
    kept = out != 0
    close(out[kept], tau[kept] / (1 - drop), atol=1e-6)
    frac = 1 - kept.float().mean().item()
    sigma = math.sqrt(drop * (1 - drop) / n)
    assert abs(frac - drop) < 6 * sigma, (frac, drop)  # 6 standard deviations of a Binomial share


def test_dare_scaling_applies_after_rescale():
    base = {"w": torch.zeros(1000)}
    tau = torch.linspace(0.5, 1.5, 1000)
    out = one("dare", base, models_from(base, [{"w": tau}]), drop=0.75, scaling=0.5, seed=4)["w"]
    kept = out != 0
    close(out[kept], tau[kept] * 0.5 / 0.25, atol=1e-6)


def test_dare_independent_of_tensor_order():
    base = random_model(26, {"a": (10, 10), "b": (33,), "c": (4, 5, 6)})
    models = random_models(base, 2, seed=27)
    rev = lambda sd: {k: sd[k] for k in reversed(list(sd))}  # noqa: E731
    for hp in (dict(merge="task_arithmetic"), dict(merge="ties", density=0.5)):
        a = one("dare", base, models, drop=0.5, seed=3, scaling=1.0, **hp)
        b = one("dare", rev(base), [rev(m) for m in models], drop=0.5, seed=3, scaling=1.0, **hp)
        assert list(b) == list(reversed(list(base)))
        for k in base:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_hand():
    # n = 10, beta 0.3 -> keep the top 7 magnitudes, gamma 0.1 -> drop the top 1
    # tau1 magnitudes sorted 10,6,4,3,2,1,.5 | .2,.1,.05: keep >= .5, drop 10
    # tau2 = +-1..10: keep >= 4, drop 10
    base = {"w": torch.zeros(10)}
    tau1 = t(0.1, -0.5, 2, -3, 10, 0.2, -1, 4, 0.05, 6)
    tau2 = t(-1, 2, -3, 4, -5, 6, -7, 8, -9, 10)
    out = one("breadcrumbs", base, models_from(base, [{"w": tau1}, {"w": tau2}]), beta=0.3, gamma=0.1, scaling=0.5)
    assert out["w"].tolist() == pytest.approx([0, -0.25, 1, 0.5, -2.5, 3, -4, 6, -4.5, 3])


def test_breadcrumbs_threshold_ties():
    # beta 0.5 -> top 3 kept with ties: threshold 1, so 3,3,1,1,1 survive the bottom cut;
    # gamma 0.2 -> int(1.2) = 1 outlier, threshold 3 with ties: both 3s dropped
    base = {"w": torch.zeros(6)}
    out = one("breadcrumbs", base, models_from(base, [{"w": t(3, 3, 1, 1, -1, 0.5)}]), beta=0.5, gamma=0.2, scaling=1.0)
    assert out["w"].tolist() == [0.0, 0.0, 1.0, 1.0, -1.0, 0.0]


def test_breadcrumbs_no_drop_is_task_arithmetic():
    base = random_model(28)
    models = random_models(base, 3, seed=29)
    a = one("breadcrumbs", base, models, beta=0.0, gamma=0.0, scaling=0.4)
    b = one("task_arithmetic", base, models, scaling=0.4)
    for k in base:
        close(a[k], b[k])


@pytest.mark.parametrize("beta,gamma", [(0.85, 0.01), (0.5, 0.1), (0.2, 0.3), (1.0, 0.0)])
def test_breadcrumbs_random_against_definition(beta, gamma):
    base = random_model(30, {"w": (10, 10), "b": (37,), "s": ()})
    models = random_models(base, 2, seed=31)
    taus = taus_of(base, models)
    out = one("breadcrumbs", base, models, beta=beta, gamma=gamma, scaling=0.3)
    for k in base:
        want = 0.3 * sum(x[k] * ref_breadcrumbs_mask(x[k], beta, gamma) for x in taus)
        close(out[k], base[k] + want)


# --------------------------------------------------------------------------- TALL masks and consensus

# Hand case (TA base, lambda 0.5): tau1 = [1,0,2,-1], tau2 = [1,3,-2,0], tau3 = [0,0,1,-1]
# tau_MTL = [2,3,1,-2]
# m1: |tau1| = [1,0,2,1]  >= .5|mtl - tau1| = [.5,1.5,.5,.5] -> [T,F,T,T]
# m2: |tau2| = [1,3,2,0]  >= .5|mtl - tau2| = [.5,0,1.5,1]   -> [T,T,T,F]
# m3: |tau3| = [0,0,1,1]  >= .5|mtl - tau3| = [1,1.5,0,.5]   -> [F,F,T,T]
# votes [2,1,3,2]
HAND_BASE = {"w": t(1, 1, 1, 1)}
HAND_TAUS = [{"w": t(1, 0, 2, -1)}, {"w": t(1, 3, -2, 0)}, {"w": t(0, 0, 1, -1)}]


def test_tall_mask_hand_task_arithmetic():
    out = run(
        "tall_mask",
        HAND_BASE,
        models_from(HAND_BASE, HAND_TAUS),
        **{"threshold": 0.5, "merge": "task_arithmetic", "scaling": 1.0},
    )
    assert [sd["w"].tolist() for sd in out] == [[3, 1, 2, -1], [3, 4, 2, 1], [1, 1, 2, -1]]
    out = run("tall_mask", HAND_BASE, models_from(HAND_BASE, HAND_TAUS), **{"threshold": 0.5, "scaling": 0.5})
    assert [sd["w"].tolist() for sd in out] == [[2, 1, 1.5, 0], [2, 2.5, 1.5, 1], [1, 1, 1.5, 0]]


def test_consensus_hand_task_arithmetic():
    models = models_from(HAND_BASE, HAND_TAUS)
    hp = {"threshold": 0.5, "merge": "task_arithmetic"}
    assert one("consensus", HAND_BASE, models, k=2, scaling=0.5, **hp)["w"].tolist() == [2, 1, 1.5, 0]
    assert one("consensus", HAND_BASE, models, k=3, scaling=1.0, **hp)["w"].tolist() == [1, 1, 2, 1]
    assert one("consensus", HAND_BASE, models, k=1, scaling=1.0, **hp)["w"].tolist() == [3, 4, 2, -1]
    # default scaling with a Task Arithmetic base is 0.3: 1 + 0.3 * [2,0,1,-2]
    assert one("consensus", HAND_BASE, models, k=2, **hp)["w"].tolist() == pytest.approx([1.6, 1, 1.3, 0.4])


# TIES base (density 0.5 -> k = 2): tau1 = [4,-1,2,.5] -> [4,0,2,0]; tau2 = [-3,2,1,.25] -> [-3,2,0,0]
# sum [1,2,2,0] -> gamma [+,+,+,0]; tau_MTL = [4,2,2,0]
# lambda 1: m1: [4,1,2,.5] >= [0,3,0,.5] -> [T,F,T,T]; m2: [3,2,1,.25] >= [7,0,1,.25] -> [F,T,T,T]
TIES_TAUS = [{"w": t(4, -1, 2, 0.5)}, {"w": t(-3, 2, 1, 0.25)}]


def test_tall_mask_hand_ties():
    base = {"w": torch.zeros(4)}
    out = run(
        "tall_mask", base, models_from(base, TIES_TAUS), **{"threshold": 1.0, "merge": "ties", "density": 0.5, "scaling": 1.0}
    )
    assert [sd["w"].tolist() for sd in out] == [[4, 0, 2, 0], [0, 2, 2, 0]]


def test_consensus_hand_ties():
    base = {"w": torch.zeros(4)}
    models = models_from(base, TIES_TAUS)
    # votes [1,1,2,2], k = 2 -> [0,0,2,0]; default scaling with a TIES base is 1.0
    out = one("consensus", base, models, **{"threshold": 1.0, "merge": "ties", "density": 0.5, "k": 2})
    assert out["w"].tolist() == [0, 0, 2, 0]


def test_tall_mask_per_task_lambda_list():
    # lambda [0, 100]: task 1 takes all of tau_MTL; task 2 only where |tau2| >= 100 |mtl - tau2|
    # (mtl - tau2 = [1,0,3,-2] -> only entry 1); task 3's lambda 0.5 as in the hand case
    out = run("tall_mask", HAND_BASE, models_from(HAND_BASE, HAND_TAUS), **{"threshold": [0.0, 100.0, 0.5], "scaling": 1.0})
    assert [sd["w"].tolist() for sd in out] == [[3, 4, 2, -1], [1, 4, 1, 1], [1, 1, 2, -1]]


@pytest.mark.parametrize("name", ["tall_mask", "consensus"])
@pytest.mark.parametrize("lam", [[0.4, 0.4], [0.4, 0.4, 0.4, 0.4], []])
def test_lambda_list_of_wrong_length_is_an_error(name, lam):
    with pytest.raises(MergeflowError, match="threshold"):
        run(name, HAND_BASE, models_from(HAND_BASE, HAND_TAUS), **{"threshold": lam})


@pytest.mark.parametrize("mtl_base,density", [("task_arithmetic", 0.2), ("ties", 0.2), ("ties", 1.0)])
@pytest.mark.parametrize("scaling", [1.0, 0.35])
def test_tall_mask_lambda_zero_is_full_multitask_vector(mtl_base, density, scaling):
    base = random_model(32)
    models = random_models(base, 3, seed=33)
    taus = taus_of(base, models)
    out = run("tall_mask", base, models, **{"threshold": 0.0, "merge": mtl_base, "density": density, "scaling": scaling})
    assert len(out) == 3
    for sd in out:
        for k in base:
            close(sd[k], base[k] + scaling * ref_mtl([x[k] for x in taus], mtl_base, density))


@pytest.mark.parametrize("mtl_base", ["task_arithmetic", "ties"])
def test_tall_mask_random_against_definition(mtl_base):
    base = random_model(34)
    models = random_models(base, 3, seed=35)
    taus = taus_of(base, models)
    lams = [0.2, 0.4, 0.6]
    out = run("tall_mask", base, models, **{"threshold": lams, "merge": mtl_base, "density": 0.3, "scaling": 0.9})
    for k in base:
        mtl = ref_mtl([x[k] for x in taus], mtl_base, 0.3)
        for sd, m in zip(out, ref_tall_masks([x[k] for x in taus], mtl, lams)):
            close(sd[k], base[k] + 0.9 * m * mtl)


@pytest.mark.parametrize("mtl_base,kk", [("task_arithmetic", 1), ("task_arithmetic", 2), ("ties", 2), ("ties", 3)])
def test_consensus_random_against_definition(mtl_base, kk):
    base = random_model(36)
    models = random_models(base, 3, seed=37)
    taus = taus_of(base, models)
    out = one("consensus", base, models, **{"k": kk, "threshold": 0.4, "merge": mtl_base, "density": 0.4, "scaling": 0.8})
    for k in base:
        mtl = ref_mtl([x[k] for x in taus], mtl_base, 0.4)
        votes = sum(m.long() for m in ref_tall_masks([x[k] for x in taus], mtl, [0.4] * 3))
        close(out[k], base[k] + 0.8 * (votes >= kk) * mtl)


@pytest.mark.parametrize("scaling", [None, 0.7])
def test_consensus_k_zero_is_the_base_method(scaling):
    base = random_model(38)
    models = random_models(base, 3, seed=39)
    a = one("consensus", base, models, **{"k": 0, "merge": "task_arithmetic", "scaling": scaling})
    b = one("task_arithmetic", base, models, scaling=0.3 if scaling is None else scaling)
    c = one("consensus", base, models, **{"k": 0, "merge": "ties", "density": 0.3, "scaling": scaling})
    d = one("ties", base, models, density=0.3, scaling=1.0 if scaling is None else scaling)
    for k in base:
        close(a[k], b[k])
        close(c[k], d[k])


@pytest.mark.parametrize("mtl_base", ["task_arithmetic", "ties"])
def test_consensus_k_above_task_count_gives_base(mtl_base):
    base = random_model(40)
    models = random_models(base, 3, seed=41)
    out = one("consensus", base, models, **{"k": 4, "merge": mtl_base, "threshold": 0.0, "scaling": 1.0})
    for k in base:
        close(out[k], base[k], atol=0, rtol=0)


# --------------------------------------------------------------------------- EMR

# Tensor "a": tau1 = [2,-1,3,0], tau2 = [1,2,-1,-2], tau3 = [-4,1,0,0]
#   sum [-1,2,2,-2] -> sigma [-,+,+,-]; tau_uni = [-4,2,3,-2]
#   M1 = [F,F,T,F], M2 = [F,T,F,T], M3 = [T,T,F,F]
# Tensor "b": tau1 = [1,1], tau2 = [1,-3], tau3 = [-1,0]
#   sum [1,-2] -> sigma [+,-]; tau_uni = [1,-3]; M1 = [T,F], M2 = [T,T], M3 = [F,F]
# rescale mean:   lambda1 = (1.5 + 1)/(.75 + .5) = 2, lambda2 = (1.5 + 2)/(1 + 2) = 7/6,
#                 lambda3 = (1.25 + .5)/(1.5 + 0) = 7/6
# rescale global: lambda1 = (6 + 2)/(3 + 1) = 2, lambda2 = (6 + 4)/(4 + 4) = 1.25, lambda3 = (5 + 1)/(6 + 0) = 1
EMR_BASE = {"a": torch.zeros(4), "b": torch.zeros(2)}
EMR_TAUS = [{"a": t(2, -1, 3, 0), "b": t(1, 1)}, {"a": t(1, 2, -1, -2), "b": t(1, -3)}, {"a": t(-4, 1, 0, 0), "b": t(-1, 0)}]


def test_emr_hand_rescale_mean():
    out = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS), rescale="mean")
    assert len(out) == 3
    want_a = [[0, 0, 6, 0], [0, 7 / 3, 0, -7 / 3], [-14 / 3, 7 / 3, 0, 0]]
    want_b = [[2, 0], [7 / 6, -3.5], [0, 0]]
    for sd, wa, wb in zip(out, want_a, want_b):
        assert sd["a"].tolist() == pytest.approx(wa, abs=1e-6)
        assert sd["b"].tolist() == pytest.approx(wb, abs=1e-6)


def test_emr_hand_rescale_global():
    out = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS), rescale="global")
    want_a = [[0, 0, 6, 0], [0, 2.5, 0, -2.5], [-4, 2, 0, 0]]
    want_b = [[2, 0], [1.25, -3.75], [0, 0]]
    for sd, wa, wb in zip(out, want_a, want_b):
        assert sd["a"].tolist() == pytest.approx(wa, abs=1e-6)
        assert sd["b"].tolist() == pytest.approx(wb, abs=1e-6)


def test_emr_default_rescale_is_mean():
    a = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS))
    b = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS), rescale="mean")
    for x, y in zip(a, b):
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])


@pytest.mark.parametrize("rescale", ["mean", "global"])
def test_emr_rebuilds_experts_when_tasks_do_not_overlap(rescale):
    base = random_model(42)
    g = torch.Generator().manual_seed(43)
    owner = {k: torch.randint(0, 4, v.shape, generator=g) for k, v in base.items()}  # 3 = nobody
    taus = [{k: torch.randn(v.shape, generator=g) * (owner[k] == i) for k, v in base.items()} for i in range(3)]
    taus[2]["s"] = torch.zeros(())  # a task that leaves a tensor alone
    models = models_from(base, taus)
    out = run("emr", base, models, rescale=rescale)
    for sd, m in zip(out, models):
        for k in base:
            close(sd[k], m[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rescale", ["mean", "global"])
def test_emr_random_against_definition(rescale):
    base = random_model(44)
    models = random_models(base, 3, seed=45)
    taus = taus_of(base, models)
    want, lam = ref_emr({k: [x[k] for x in taus] for k in base}, rescale)
    out = run("emr", base, models, rescale=rescale)
    for i, sd in enumerate(out):
        for k in base:
            close(sd[k], base[k] + want[k][i])
    assert all(x > 0 for x in lam)


def test_emr_rescale_modes_differ_on_unequal_tensor_sizes():
    out_m = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS), rescale="mean")
    out_g = run("emr", EMR_BASE, models_from(EMR_BASE, EMR_TAUS), rescale="global")
    assert not torch.allclose(out_m[1]["a"], out_g[1]["a"])


# --------------------------------------------------------------------------- T-Switch


def test_tswitch_hand():
    # positives [3,1,.5,2] (4) -> keep int(4*.5) = 2: 3, 2; negatives [-2,-4,-1] (3) -> keep int(1.5) = 1: -4
    # B = [1,0,0,0,-1,1,0,0], s = sqrt((9 + 16 + 4)/3)
    base = {"w": t(1, 1, 1, 1, 1, 1, 1, 1), "s": t(2.0)[0], "z": t(5, 6)}
    tau = {"w": t(3, 1, -2, 0.5, -4, 2, 0, -1), "s": t(0.75)[0], "z": t(0, 0)}
    out = run("tswitch", base, models_from(base, [tau]), drop=0.5)
    assert len(out) == 1
    s = math.sqrt(29 / 3)
    assert out[0]["w"].tolist() == pytest.approx([1 + s, 1, 1, 1, 1 - s, 1 + s, 1, 1], abs=1e-6)
    assert out[0]["s"].item() == 2.75  # 0-dim tensors stay dense
    assert out[0]["z"].tolist() == [5.0, 6.0]  # all-zero task vector skipped


def test_tswitch_threshold_ties_kept_and_per_task():
    # positives [2,2,1]: keep int(1.5) = 1 -> threshold 2, both 2s kept; negative [-3]: int(.5) = 0 -> too few
    # to prune, kept whole; s = sqrt((4 + 4 + 9) / 3)
    base = {"w": torch.zeros(4)}
    out = run("tswitch", base, models_from(base, [{"w": t(2, 2, 1, -3)}, {"w": t(-1, -1, -1, -1)}]), drop=0.5)
    s = math.sqrt(17 / 3)
    assert out[0]["w"].tolist() == pytest.approx([s, s, 0.0, -s], abs=1e-6)
    # task 2: 4 negatives keep 2 -> threshold 1 ties -> all 4 kept, s = 1
    assert out[1]["w"].tolist() == [-1.0, -1.0, -1.0, -1.0]


@pytest.mark.parametrize("drop", [0.0, 0.6, 0.9])
def test_tswitch_random_against_definition(drop):
    base = random_model(46)
    models = random_models(base, 2, seed=47)
    taus = taus_of(base, models)
    out = run("tswitch", base, models, drop=drop)
    for sd, tau in zip(out, taus):
        for k in base:
            close(sd[k], base[k] + ref_tswitch(tau[k], drop), atol=1e-5)


# --------------------------------------------------------------------------- hyper-parameters


def _bad(name, key, value):
    m = methods.get(name)
    with pytest.raises(MergeflowError) as e:
        m.hyper({key: value})
    assert re.search(rf"\b{re.escape(key)}\b", str(e.value)), str(e.value)
    with pytest.raises(MergeflowError) as e:
        run(name, HAND_BASE, models_from(HAND_BASE, HAND_TAUS), **{key: value})
    assert re.search(rf"\b{re.escape(key)}\b", str(e.value)), str(e.value)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("task_arithmetic", "scaling", -0.1),
        ("task_arithmetic", "scaling", 10.5),
        ("task_arithmetic", "scaling", "0.3"),
        ("ties", "density", 1.2),
        ("ties", "density", -0.1),
        ("ties", "scaling", -1.0),
        ("ties", "scope", "layer"),
        ("dare", "drop", 1.0),
        ("dare", "drop", -0.1),
        ("dare", "merge", "mean"),
        ("dare", "density", 1.5),
        ("dare", "seed", -1),
        ("dare", "seed", 1.5),
        ("dare", "scaling", 11.0),
        ("breadcrumbs", "beta", 1.1),
        ("breadcrumbs", "gamma", -0.01),
        ("breadcrumbs", "scaling", -0.3),
        ("consensus", "k", -1),
        ("consensus", "threshold", -0.5),
        ("consensus", "threshold", 101.0),
        ("consensus", "merge", "emr"),
        ("consensus", "density", 2.0),
        ("consensus", "scaling", -2.0),
        ("tall_mask", "threshold", -1.0),
        ("tall_mask", "merge", "dare"),
        ("tall_mask", "density", -0.5),
        ("tall_mask", "scaling", 20.0),
        ("tall_mask", "threshold", "0.4"),
        ("emr", "rescale", "median"),
        ("tswitch", "drop", 1.5),
        ("tswitch", "drop", -0.2),
    ],
)
def test_bad_hyper_parameter_values(name, key, value):
    _bad(name, key, value)


@pytest.mark.parametrize("name", ["tall_mask", "consensus"])
def test_lambda_list_element_out_of_range(name):
    _bad(name, "threshold", [0.4, -1.0, 0.4])


def test_documented_parameters_and_defaults():
    want = {
        "weight_average": {},
        "task_arithmetic": {"scaling": 0.3},
        "ties": {"density": 0.2, "scaling": 1.0, "scope": "tensor"},
        "dare": {"drop": 0.9, "merge": "task_arithmetic", "scaling": 0.3, "density": 1.0, "seed": 0},
        "breadcrumbs": {"beta": 0.85, "gamma": 0.01, "scaling": 0.3},
        "consensus": {"k": 2, "threshold": 0.4, "merge": "task_arithmetic", "density": 0.2, "scaling": None},
        "tall_mask": {"threshold": 0.4, "merge": "task_arithmetic", "density": 0.2, "scaling": 1.0},
        "emr": {"rescale": "mean"},
        "tswitch": {"drop": 0.6},
    }
    for name, defaults in want.items():
        assert methods.get(name).hyper() == defaults, name


def test_boundary_values_accepted():
    base = {"w": t(1.0, -2.0, 0.5, 3.0)}
    models = models_from(base, [{"w": t(1, 2, 3, 4)}, {"w": t(-1, 1, -1, 1)}])
    for name, hp in [
        ("ties", {"density": 0.0}),
        ("ties", {"density": 1.0}),
        ("dare", {"drop": 0.0}),
        ("dare", {"drop": 0.999}),
        ("breadcrumbs", {"beta": 1.0, "gamma": 1.0}),
        ("consensus", {"k": 0, "threshold": [0.0, 100.0]}),
        ("tswitch", {"drop": 0.999}),
        ("task_arithmetic", {"scaling": 0}),
        ("tall_mask", {"threshold": 1}),
    ]:
        out = run(name, base, models, **hp)
        assert all(torch.isfinite(sd["w"]).all() for sd in out), (name, hp)
