"""Auto-Switch routing against hand-built cases and an independent brute-force reference."""

from __future__ import annotations

import json
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergeflow import autoswitch
from mergeflow.autoswitch import QuerySet, combine, group_rows, route, routing_accuracy, sample_queries
from mergeflow.errors import MergeflowError


def qs(points, labels, tasks=None) -> QuerySet:
    labels = list(labels)
    tasks = tasks or [f"t{i}" for i in range(max(labels) + 1)]
    return QuerySet(torch.tensor(points, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64), tasks)


def fractions(row) -> list[Fraction]:
    return [Fraction(v).limit_denominator(1000) for v in row.tolist()]


def reference_route(points, labels, n_tasks, x, k):
    """Brute force on integer coordinates: sort by (exact squared distance, query index)."""
    out = []
    for p in x:
        order = sorted(range(len(points)), key=lambda j: (sum((a - b) ** 2 for a, b in zip(p, points[j])), j))
        shares = [Fraction(0)] * n_tasks
        for j in order[:k]:
            shares[labels[j]] += Fraction(1, k)
        out.append(shares)
    return out


# --- routing weights ------------------------------------------------------------------------

# task 0 near the origin, task 1 near (10, 0), task 2 at (0, 10); labels interleaved on purpose
HAND_POINTS = [[10, 0], [0, 0], [0, 10], [1, 0], [10, 1], [0, 1]]
HAND_LABELS = [1, 0, 2, 0, 1, 0]


def test_hand_built_neighbours():
    q = qs(HAND_POINTS, HAND_LABELS)
    # from (6, 0): (10,0)=4 t1, (10,1)=sqrt17 t1, (1,0)=5 t0, (0,0)=6 t0, (0,1)=sqrt37 t0, (0,10) t2
    x = torch.tensor([[6.0, 0.0]])
    expected = {
        2: [0, 1, 0],
        3: [Fraction(1, 3), Fraction(2, 3), 0],
        4: [Fraction(1, 2), Fraction(1, 2), 0],
        5: [Fraction(3, 5), Fraction(2, 5), 0],
        6: [Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)],
    }
    for k, shares in expected.items():
        w = route(q, x, k=k)
        assert w.shape == (1, 3) and w.dtype == torch.float32
        assert fractions(w[0]) == shares, k
    # from (0.2, 0.1): the three task-0 points are the three nearest, then (0, 10)/(10, 0) far away
    assert route(q, torch.tensor([[0.2, 0.1]]), k=3).tolist() == [[1.0, 0.0, 0.0]]
    assert route(q, torch.tensor([[0.0, 9.0]]), k=1).tolist() == [[0.0, 0.0, 1.0]]


def test_k_one_and_k_all():
    q = qs(HAND_POINTS, HAND_LABELS)
    x = torch.tensor([[9.0, 0.4], [0.4, 0.4], [1.0, 8.0], [-3.0, -3.0]])
    assert route(q, x, k=1).tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]
    # k = N: every input sees the whole query set, so shares are the task counts over N
    w = route(q, x, k=6)
    for row in w:
        assert fractions(row) == [Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)]


def test_rows_sum_to_one_and_weights_are_multiples_of_one_over_k():
    g = torch.Generator().manual_seed(1)
    q = QuerySet(torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g), ["a", "b", "c", "d"])
    w = route(q, torch.randn(25, 5, generator=g), k=7)
    assert torch.allclose(w.sum(1), torch.ones(25))
    assert torch.equal(torch.round(w * 7), w * 7)


def test_distance_ties_go_to_the_lower_query_index():
    x = torch.zeros(1, 2)
    # (1, 0) and (-1, 0) are equally far from the origin: the first query listed wins
    assert route(qs([[1, 0], [-1, 0]], [1, 0]), x, k=1).tolist() == [[0.0, 1.0]]
    assert route(qs([[-1, 0], [1, 0]], [0, 1]), x, k=1).tolist() == [[1.0, 0.0]]
    # four queries at distance 1, labels [2, 0, 1, 0]: k=2 takes indices 0 and 1
    q = qs([[0, 1], [1, 0], [0, -1], [-1, 0]], [2, 0, 1, 0])
    assert route(q, x, k=2).tolist() == [[0.5, 0.0, 0.5]]
    assert fractions(route(q, x, k=3)[0]) == [Fraction(1, 3)] * 3


def test_route_matches_brute_force_on_a_tied_grid():
    """Integer points in a small box: many exact distance ties, all broken by query index."""
    g = torch.Generator().manual_seed(7)
    points = torch.randint(-3, 4, (30, 3), generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    x = torch.randint(-3, 4, (50, 3), generator=g)
    q = QuerySet(points.float(), labels, ["a", "b", "c"])
    for k in (1, 2, 5, 13, 30):
        expected = reference_route(points.tolist(), labels.tolist(), 3, x.tolist(), k)
        got = route(q, x.float(), k=k)
        assert [fractions(r) for r in got] == expected, k


def test_route_errors():
    q = qs(HAND_POINTS, HAND_LABELS)
    x = torch.zeros(2, 2)
    for k in (0, -1, 7, 2.0, True):
        with pytest.raises(MergeflowError, match="k"):
            route(q, x, k=k)
    with pytest.raises(MergeflowError, match=r"\[B, 2\]"):
        route(q, torch.zeros(2, 3), k=1)
    with pytest.raises(MergeflowError, match="non-finite"):
        route(q, torch.tensor([[float("nan"), 0.0]]), k=1)
    assert route(q, torch.zeros(0, 2), k=3).shape == (0, 3)


def test_chunked_routing_equals_unchunked(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q = QuerySet(torch.randn(64, 8, generator=g), torch.randint(0, 5, (64,), generator=g), list("abcde"))
    x = torch.randn(101, 8, generator=g)
    whole = route(q, x, k=9)
    for chunk in (1, 64, 64 * 7, 64 * 100 - 1):
        monkeypatch.setattr(autoswitch, "CHUNK_DISTANCES", chunk)
        assert torch.equal(route(q, x, k=9), whole), chunk


@settings(max_examples=40, deadline=None)
@given(
    n_tasks=st.integers(1, 5),
    n_per_task=st.integers(1, 12),
    dim=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_separated_clusters_route_one_hot(n_tasks, n_per_task, dim, data, seed):
    """Clusters far apart and k <= n_per_task: inputs near a cluster get that task only (T-Switch)."""
    k = data.draw(st.integers(1, n_per_task))
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(n_tasks, dim)
    centres[:, 0] = 100.0 * torch.arange(n_tasks)  # 100 apart; points stay within 1 of a centre
    emb = centres.repeat_interleave(n_per_task, 0) + torch.rand(n_tasks * n_per_task, dim, generator=g) - 0.5
    labels = torch.arange(n_tasks).repeat_interleave(n_per_task)
    perm = torch.randperm(len(labels), generator=g)
    q = QuerySet(emb[perm], labels[perm], [f"t{i}" for i in range(n_tasks)])
    truth = torch.randint(0, n_tasks, (20,), generator=g)
    x = centres[truth] + torch.rand(20, dim, generator=g) - 0.5
    w = route(q, x, k=k)
    one_hot = torch.nn.functional.one_hot(truth, n_tasks).float()
    assert torch.equal(w, one_hot)
    for mode in ("sample", "hard"):
        assert torch.equal(combine(w, mode), one_hot)
    assert routing_accuracy(w, truth) == 1.0
    for row, idx in group_rows(w):
        assert torch.equal(truth[idx], torch.full_like(idx, int(row.argmax())))


# --- modes, accuracy, grouping ----------------------------------------------------------------

W = torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.0, 0.0, 1.0]])


def test_combine_modes():
    assert torch.equal(combine(W, "sample"), W)
    batch = combine(W, "batch")
    mean = [(0.6 + 0.5 + 0.2 + 0.0) / 4, (0.4 + 0.5 + 0.4 + 0.0) / 4, (0.0 + 0.0 + 0.4 + 1.0) / 4]
    assert batch.shape == W.shape
    assert all(torch.equal(row, batch[0]) for row in batch)
    assert torch.allclose(batch[0], torch.tensor(mean))
    # argmax with ties to the lower task index
    assert combine(W, "hard").tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert combine(torch.zeros(0, 3), "batch").shape == (0, 3)


def test_combine_unknown_mode_lists_modes():
    with pytest.raises(MergeflowError, match="batch, sample, hard"):
        combine(W, "soft")


def test_routing_accuracy_hand_case():
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    truth = torch.tensor([0, 1, 1, 1])  # hit, miss (tie -> task 0), hit, miss
    assert routing_accuracy(w, truth) == 0.5
    assert routing_accuracy(w, torch.tensor([0, 0, 1, 0])) == 1.0
    with pytest.raises(MergeflowError):
        routing_accuracy(w, torch.tensor([0, 1]))
    with pytest.raises(MergeflowError):
        routing_accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))


def test_group_rows():
    a, b, c = [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.25, 0.75]
    w = torch.tensor([a, b, a, c, b, a])
    groups = group_rows(w)
    assert [(g.tolist(), idx.tolist()) for g, idx in groups] == [(a, [0, 2, 5]), (b, [1, 4]), (c, [3])]
    assert all(idx.dtype == torch.int64 for _, idx in groups)
    assert group_rows(torch.zeros(0, 3)) == []


def test_group_rows_covers_each_row_once():
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 3, (200, 4), generator=g).float() / 2
    groups = group_rows(w)
    covered = torch.cat([idx for _, idx in groups])
    assert sorted(covered.tolist()) == list(range(200))
    for row, idx in groups:
        assert torch.equal(w[idx], row.expand(len(idx), -1))
    firsts = [int(idx[0]) for _, idx in groups]
    assert firsts == sorted(firsts)
    assert len({tuple(r.tolist()) for r, _ in groups}) == len(groups)
    # batch mode: one combination for the whole batch
    assert len(group_rows(combine(w, "batch"))) == 1


# --- query sets ---------------------------------------------------------------------------------


def _tagged(task: int, n: int) -> torch.Tensor:
    """Rows that name their origin: column 0 the task, column 1 the row index."""
    return torch.stack([torch.full((n,), float(task)), torch.arange(n, dtype=torch.float32), torch.zeros(n)], 1)


def test_sample_queries_counts_labels_and_disjointness():
    train = {"mnist": _tagged(0, 500), "svhn": _tagged(1, 30), "gtsrb": _tagged(2, 250)}
    q = sample_queries(train, n_per_task=100, seed=0)
    assert q.tasks == ["mnist", "svhn", "gtsrb"]
    assert q.labels.tolist() == [0] * 100 + [1] * 30 + [2] * 100
    assert q.embeddings.dtype == torch.float32
    for t in range(3):
        rows = q.embeddings[q.labels == t]
        assert torch.all(rows[:, 0] == t)  # drawn from its own task
        assert len(set(rows[:, 1].tolist())) == len(rows)  # without replacement
    assert sorted(q.embeddings[q.labels == 1][:, 1].tolist()) == list(range(30))  # all when fewer


def test_sample_queries_deterministic():
    train = {"a": _tagged(0, 300), "b": _tagged(1, 300)}
    one, two = sample_queries(train, 50, seed=4), sample_queries(train, 50, seed=4)
    assert torch.equal(one.embeddings, two.embeddings) and torch.equal(one.labels, two.labels)
    assert not torch.equal(sample_queries(train, 50, seed=5).embeddings, one.embeddings)
    # task a's choice depends on (seed, its index, its rows) only
    other = sample_queries({"a": _tagged(0, 300), "z": _tagged(1, 77)}, 50, seed=4)
    assert torch.equal(other.embeddings[other.labels == 0], one.embeddings[one.labels == 0])
    # the two tasks are not drawn with the same permutation
    assert one.embeddings[one.labels == 0][:, 1].tolist() != one.embeddings[one.labels == 1][:, 1].tolist()


def test_sample_queries_errors():
    with pytest.raises(MergeflowError):
        sample_queries({})
    with pytest.raises(MergeflowError):
        sample_queries({"a": _tagged(0, 5)}, n_per_task=0)
    with pytest.raises(MergeflowError, match="dim"):
        sample_queries({"a": torch.zeros(5, 3), "b": torch.zeros(5, 4)})
    with pytest.raises(MergeflowError):
        sample_queries({"a": torch.zeros(0, 3)})


def test_queryset_validation():
    with pytest.raises(MergeflowError, match="labels"):
        QuerySet(torch.zeros(3, 2), torch.tensor([0, 1, 2]), ["a", "b"])
    with pytest.raises(MergeflowError, match="float32"):
        QuerySet(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1]), ["a", "b"])
    with pytest.raises(MergeflowError, match="labels"):
        QuerySet(torch.zeros(3, 2), torch.tensor([0, 1]), ["a", "b"])


def test_nbytes_counts_the_stored_tensors():
    q = sample_queries({"a": torch.randn(150, 16), "b": torch.randn(80, 16)}, n_per_task=100)
    n = 100 + 80
    assert q.nbytes == n * 16 * 4 + n * 8
    assert q.nbytes == q.embeddings.numel() * 4 + q.labels.numel() * 8


def test_save_load_round_trip(tmp_path):
    q = sample_queries({"cars": torch.randn(20, 6), "dtd": torch.randn(9, 6)}, n_per_task=10, seed=2)
    path = tmp_path / "queries.safetensors"
    q.save(path)
    back = QuerySet.load(path)
    assert torch.equal(back.embeddings, q.embeddings) and torch.equal(back.labels, q.labels)
    assert back.tasks == ["cars", "dtd"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["embeddings", "labels"]
    assert meta == {"format": "mergeflow.queryset", "format_version": "1", "tasks": json.dumps(["cars", "dtd"])}
    first = path.read_bytes()
    q.save(path)
    assert path.read_bytes() == first  # reproducible bytes
    assert [p.name for p in tmp_path.iterdir()] == ["queries.safetensors"]  # no temporary left


def _expect_load_error(path, match=None):
    with pytest.raises(MergeflowError) as err:
        QuerySet.load(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    if match:
        assert match in msg
    return msg


def test_load_errors(tmp_path):
    q = qs(HAND_POINTS, HAND_LABELS)
    good = tmp_path / "q.safetensors"
    q.save(good)
    raw = good.read_bytes()

    _expect_load_error(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-5])
    _expect_load_error(truncated)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(raw[:20])
    _expect_load_error(header_cut)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels}, str(foreign), metadata={"format": "pt"})
    _expect_load_error(foreign, "not a mergeflow.queryset file")

    meta = {"format": "mergeflow.queryset", "format_version": "1", "tasks": json.dumps(q.tasks)}
    newer = tmp_path / "newer.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels}, str(newer), metadata={**meta, "format_version": "2"})
    _expect_load_error(newer, "newer")

    wrong_dtype = tmp_path / "dtype.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels.int()}, str(wrong_dtype), metadata=meta)
    _expect_load_error(wrong_dtype, "int64")

    wrong_shape = tmp_path / "shape.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels[:4]}, str(wrong_shape), metadata=meta)
    _expect_load_error(wrong_shape, "4 labels for 6 embeddings")

    flat = tmp_path / "flat.safetensors"
    save_file({"embeddings": q.embeddings.flatten(), "labels": q.labels}, str(flat), metadata=meta)
    _expect_load_error(flat, "[N, D]")

    extra = tmp_path / "extra.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels, "x": q.labels.clone()}, str(extra), metadata=meta)
    _expect_load_error(extra, "expected")

    bad_tasks = tmp_path / "tasks.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels}, str(bad_tasks), metadata={**meta, "tasks": "[oops"})
    _expect_load_error(bad_tasks, "JSON")

    few_tasks = tmp_path / "few_tasks.safetensors"
    save_file({"embeddings": q.embeddings, "labels": q.labels}, str(few_tasks), metadata={**meta, "tasks": '["a"]'})
    _expect_load_error(few_tasks, "labels must lie")

    # a hand-corrupted header length
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    _expect_load_error(garbled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(11)
    points = torch.randint(-3, 4, (80, 4), generator=g).float()
    labels = torch.randint(0, 4, (80,), generator=g)
    x = torch.randint(-3, 4, (300, 4), generator=g).float()
    q = QuerySet(points, labels, list("abcd"))
    for k in (1, 10, 80):
        cpu = route(q, x, k=k)
        gpu = route(q.to("cuda"), x.cuda(), k=k)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
        for mode in ("batch", "sample", "hard"):
            assert torch.allclose(combine(gpu, mode).cpu(), combine(cpu, mode))
        assert [(r.tolist(), i.tolist()) for r, i in group_rows(combine(gpu, "hard"))] == [
            (r.tolist(), i.tolist()) for r, i in group_rows(combine(cpu, "hard"))
        ]
        truth = torch.randint(0, 4, (300,), generator=g)
        assert routing_accuracy(gpu, truth.cuda()) == routing_accuracy(cpu, truth)


@pytest.mark.parametrize("dim,k", [(3, 4), (64, 1), (256, 10), (512, 37)])
def test_route_equals_brute_force_exact_distances(dim, k):
    """The product-then-candidates search picks exactly what a full exact-distance sort picks,
    on crowded high-dimensional embeddings with duplicate queries, inputs equal to queries and
    near-ties one float32 step apart."""
    g = torch.Generator().manual_seed(dim + k)
    centres = torch.nn.functional.normalize(torch.randn(4, dim, generator=g), dim=-1)
    labels = torch.randint(0, 4, (300,), generator=g)
    emb = torch.nn.functional.normalize(centres[labels] + torch.randn(300, dim, generator=g) / dim**0.5, dim=-1)
    emb[10] = emb[3]  # a duplicate query: ties go to index 3
    emb[11] = torch.nextafter(emb[4], torch.full_like(emb[4], 2.0))  # one step away from query 4
    x = torch.nn.functional.normalize(
        centres[torch.randint(0, 4, (120,), generator=g)] + torch.randn(120, dim, generator=g) / dim**0.5, dim=-1
    )
    x[:3] = emb[[3, 4, 11]]  # inputs sitting on queries
    q = QuerySet(emb, labels, list("abcd"))
    full = torch.cdist(x[:, None, :], emb.expand(len(x), -1, -1), compute_mode="donot_use_mm_for_euclid_dist")[:, 0, :]
    nearest = torch.sort(full, dim=1, stable=True).indices[:, :k]
    expected = torch.zeros(len(x), 4).scatter_add_(1, labels[nearest], torch.ones(nearest.shape)) / k
    assert torch.equal(route(q, x, k=k), expected)
