"""Auto-Switch routing (Qi et al., CVPR 2025, "Less is More: Efficient Model Merging with Binary Task Switch").

Task identity unknown at test time: a small query set (a few train samples per task, embedded
with the base model's features) is stored beside the switches. An input x is routed by its k
nearest queries (Euclidean): w_t(x) = share of the k neighbours that belong to task t, and its
model is theta_0 + sum_t w_t(x) s_t B_t. Modes (``combine``): ``batch`` (the paper's: weights
averaged over a batch), ``sample`` (per input) and ``hard`` (argmax, as the authors do for text).
Routing uses torch only and runs the same code on CPU and CUDA.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_file

FORMAT_NAME = "mergeflow.queryset"
FORMAT_VERSION = 1
MODES = ("batch", "sample", "hard")
QUERIES_NAME = "queries.safetensors"  # the query set's file, beside the switches
CHUNK_DISTANCES = 1 << 22  # input-to-query distances held at once by ``route`` (bounds memory)

_TENSORS = {"embeddings": ("F32", torch.float32, "<f4"), "labels": ("I64", torch.int64, "<i8")}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _problem(embeddings: object, labels: object, tasks: object) -> str | None:
    """What is wrong with a query set's parts, or None."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dtype != torch.float32 or embeddings.dim() != 2:
        got = (
            f"{embeddings.dtype} {list(embeddings.shape)}" if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        )
        return f"embeddings must be a float32 [N, D] tensor, got {got}"
    n, d = embeddings.shape
    if n < 1 or d < 1:
        return f"embeddings must be non-empty, got shape {[n, d]}"
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        got = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        return f"labels must be an int64 [N] tensor, got {got}"
    if labels.numel() != n:
        return f"{labels.numel()} labels for {n} embeddings"
    if labels.device != embeddings.device:
        return f"labels on {labels.device}, embeddings on {embeddings.device}"
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        return f"tasks must be a non-empty list of strings, got {tasks!r}"
    if len(set(tasks)) != len(tasks):
        return f"tasks must be distinct, got {tasks!r}"
    if int(labels.min()) < 0 or int(labels.max()) >= len(tasks):
        return f"labels must lie in [0, {len(tasks)}), got [{int(labels.min())}, {int(labels.max())}]"
    if not bool(torch.isfinite(embeddings).all()):
        return "embeddings hold non-finite values"
    return None


@dataclass
class QuerySet:
    """Embedded queries: ``embeddings`` float32 [N, D], ``labels`` int64 [N] (index into ``tasks``)."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    tasks: list[str]

    def __post_init__(self) -> None:
        problem = _problem(self.embeddings, self.labels, self.tasks)
        if problem:
            raise MergeflowError(f"query set: {_one_line(problem)}")

    @property
    def nbytes(self) -> int:
        """Stored tensor bytes (embeddings + labels), the query set's share of the method's storage."""
        return sum(t.numel() * t.element_size() for t in (self.embeddings, self.labels))

    def to(self, device: torch.device | str) -> QuerySet:
        """The same query set on ``device``."""
        return QuerySet(self.embeddings.to(device), self.labels.to(device), list(self.tasks))

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically; the header is written by hand so bytes are reproducible."""
        arrays = {"embeddings": self.embeddings, "labels": self.labels}
        header: dict = {
            "__metadata__": {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "tasks": json.dumps(self.tasks)}
        }
        blobs, offset = [], 0
        for key, (code, _, np_dtype) in _TENSORS.items():
            data = arrays[key].detach().cpu().contiguous().numpy().astype(np_dtype).tobytes()
            header[key] = {"dtype": code, "shape": list(arrays[key].shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        raw += b" " * (-len(raw) % 8)
        with atomic_file(path) as tmp:
            tmp.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuerySet:
        """Read a file written by ``save``; a missing, corrupt or foreign file raises MergeflowError."""
        from safetensors import safe_open

        def fail(what: str) -> MergeflowError:
            return MergeflowError(f"{path}: {_one_line(what)}")

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT_NAME:
                    raise fail(f"not a {FORMAT_NAME} file (format {meta.get('format')!r})")
                version = meta.get("format_version", "")
                if not version.isdigit() or int(version) < 1:
                    raise fail(f"invalid query set format version {version!r}")
                if int(version) > FORMAT_VERSION:
                    raise fail(
                        f"query set format version {version} is newer than this mergeflow reads "
                        f"({FORMAT_VERSION}); upgrade mergeflow"
                    )
                keys = sorted(f.keys())
                if keys != sorted(_TENSORS):
                    raise fail(f"query set tensors {keys}, expected {sorted(_TENSORS)}")
                embeddings, labels = f.get_tensor("embeddings"), f.get_tensor("labels")
                try:
                    tasks = json.loads(meta.get("tasks", ""))
                except ValueError as e:
                    raise fail(f"query set tasks metadata is not JSON ({e})") from None
        except MergeflowError:
            raise
        except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
            raise fail(f"not a readable query set file ({type(e).__name__}: {e})") from None
        problem = _problem(embeddings, labels, tasks)
        if problem:
            raise fail(f"bad query set: {problem}")
        return cls(embeddings, labels, tasks)


def _task_seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index) % (1 << 63)


def query_rows(n_rows: int, n_per_task: int, seed: int, position: int) -> torch.Tensor:
    """The sorted rows :func:`sample_queries` picks for the task at ``position`` among ``n_rows``:
    embed only these, then pass their embeddings to it (it keeps them all, in order)."""
    gen = torch.Generator().manual_seed(_task_seed(seed, position))
    return torch.randperm(n_rows, generator=gen)[:n_per_task].sort().values


def sample_queries(train_embeddings: dict[str, torch.Tensor], n_per_task: int = 100, seed: int = 0) -> QuerySet:
    """Pick ``n_per_task`` rows per task (all if fewer) without replacement, deterministically.

    Task t's choice depends only on (seed, t's position, its row count); tasks in dict order.
    """
    if not train_embeddings:
        raise MergeflowError("sample_queries: no tasks given")
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise MergeflowError(f"sample_queries: n_per_task must be a positive integer, got {n_per_task!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MergeflowError(f"sample_queries: seed must be a non-negative integer, got {seed!r}")
    chosen, labels, dim = [], [], None
    for i, (task, emb) in enumerate(train_embeddings.items()):
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] < 1 or not emb.is_floating_point():
            got = f"{emb.dtype} {list(emb.shape)}" if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise MergeflowError(f"sample_queries: task {task}: embeddings must be a non-empty float [n, D] tensor, got {got}")
        if dim is not None and emb.shape[1] != dim:
            raise MergeflowError(f"sample_queries: task {task}: embedding dim {emb.shape[1]}, other tasks have {dim}")
        dim = emb.shape[1]
        idx = query_rows(emb.shape[0], n_per_task, seed, i)
        chosen.append(emb.detach()[idx.to(emb.device)].to(torch.float32))
        labels.append(torch.full((idx.numel(),), i, dtype=torch.int64, device=emb.device))
    devices = {c.device for c in chosen}
    if len(devices) > 1:
        raise MergeflowError(f"sample_queries: task embeddings on several devices {sorted(map(str, devices))}")
    return QuerySet(torch.cat(chosen).contiguous(), torch.cat(labels), list(train_embeddings))


def route(queries: QuerySet, x: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Routing weights [B, T]: share of each task among the k nearest queries of each row of x.

    Exact Euclidean distances; ties in distance go to the query of lower index. Fast and
    exact: squared distances from one matrix product (||x||^2 + ||q||^2 - 2 x.q) pick, per
    input, every query that can be among its k nearest given that product's rounding error
    bound; only those candidates get exact distances (``torch.cdist`` without matrix
    products), and the k nearest are chosen among them. Batches are processed in chunks of
    about CHUNK_DISTANCES distances so memory stays bounded.
    """
    n, d = queries.embeddings.shape
    n_tasks = len(queries.tasks)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MergeflowError(f"route: k must be a positive integer, got {k!r}")
    if k > n:
        raise MergeflowError(f"route: k={k} exceeds the {n} queries")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MergeflowError(f"route: inputs must be a [B, {d}] tensor, got {got}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise MergeflowError("route: inputs hold non-finite values")
    emb = queries.embeddings.detach().to(x.device)
    labels = queries.labels.to(x.device)
    q_sq = (emb.double() ** 2).sum(1)
    q_norm_max = float(q_sq.max().sqrt())
    out = torch.zeros((x.shape[0], n_tasks), dtype=torch.float32, device=x.device)
    rows = max(1, CHUNK_DISTANCES // n)
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        nearest = _nearest(chunk, emb, q_sq, q_norm_max, k)
        counts = torch.zeros((chunk.shape[0], n_tasks), dtype=torch.float32, device=x.device)
        counts.scatter_add_(1, labels[nearest], torch.ones(nearest.shape, dtype=torch.float32, device=x.device))
        out[start : start + rows] = counts / k
    return out


def _nearest(x: torch.Tensor, emb: torch.Tensor, q_sq: torch.Tensor, q_norm_max: float, k: int) -> torch.Tensor:
    """Indices [B, k] of each row's k nearest queries by ``torch.cdist``'s exact float32
    distances, ties to the lower index.

    One float32 product gives s_i = |q_i|^2 - 2 x.q_i, so that a_i = |x|^2 + s_i is the squared
    distance t_i within beta = (d + 8) eps32 (|x|^2 + |q|^2 + 2 |x| |q|); cdist's values c_i
    satisfy c_i^2 = t_i (1 +- rho), rho = (d + 3) eps32. Every query with c_i at most the k-th
    smallest c then has a_i <= (A_k + beta) (1 + rho) / (1 - rho) + beta, A_k the k-th
    smallest a: those candidates (a superset: the m smallest s, m the largest candidate count
    of the chunk) get exact distances, and the k nearest are picked among them. The bound is
    a worst case: embeddings in hundreds of dimensions crowd near the k-th distance, so m is
    often a few times k, still far below the query count."""
    n, d = emb.shape
    eps = torch.finfo(torch.float32).eps
    x_sq = (x.double() ** 2).sum(1)
    s = torch.addmm(q_sq.to(torch.float32)[None, :], x, emb.T, alpha=-2.0)
    beta = (d + 8) * eps * (x_sq + q_norm_max**2 + 2 * x_sq.sqrt() * q_norm_max)
    rho = (d + 3) * eps
    a_k = s.topk(k, dim=1, largest=False, sorted=False).values.max(dim=1).values.double() + x_sq
    bound = ((a_k + beta) * (1 + rho) / (1 - rho) + beta - x_sq).to(torch.float32)
    bound = torch.nextafter(bound, torch.full_like(bound, float("inf")))  # rounded up, never down
    m = int((s <= bound[:, None]).sum(1).max())
    if m >= n:  # every query is a candidate somewhere: exact distances to all
        cand = torch.arange(n, device=x.device).expand(x.shape[0], n)
    else:  # the m closest by the product (a superset of every row's candidates), in index order
        cand = s.topk(m, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    out = torch.empty((x.shape[0], k), dtype=torch.int64, device=x.device)
    rows = max(1, (1 << 20) // (m * d))  # candidates' vectors gathered a block of rows at a time (stays in cache)
    for start in range(0, x.shape[0], rows):
        c = cand[start : start + rows]
        vectors = torch.index_select(emb, 0, c.reshape(-1)).view(c.shape[0], c.shape[1], d)
        exact = torch.cdist(x[start : start + rows, None, :], vectors, compute_mode="donot_use_mm_for_euclid_dist")[:, 0, :]
        order = torch.sort(exact, dim=1, stable=True).indices[:, :k]  # stable: ties keep index order
        out[start : start + rows] = c.gather(1, order)
    return out


def _check_weights(weights: torch.Tensor, who: str) -> None:
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or not weights.is_floating_point():
        got = f"{weights.dtype} {list(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise MergeflowError(f"{who}: weights must be a float [B, T] tensor, got {got}")


def _top(weights: torch.Tensor) -> torch.Tensor:
    """Per-row argmax, ties to the lowest task index (explicit, so every backend agrees)."""
    n_tasks = weights.shape[1]
    is_max = weights == weights.max(dim=1, keepdim=True).values
    index = torch.arange(n_tasks, device=weights.device).expand_as(weights)
    return torch.where(is_max, index, torch.full_like(index, n_tasks)).min(dim=1).values


def combine(weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights per row under ``mode``: ``sample`` as is, ``batch`` the batch mean, ``hard`` one-hot argmax."""
    if mode not in MODES:
        raise MergeflowError(f"auto-switch mode {mode!r}: not one of {', '.join(MODES)}")
    _check_weights(weights, "combine")
    if mode == "sample" or weights.shape[0] == 0:
        return weights
    if mode == "batch":
        return weights.mean(dim=0, keepdim=True).repeat(weights.shape[0], 1)
    hard = torch.zeros_like(weights)
    return hard.scatter_(1, _top(weights)[:, None], 1.0)


def routing_accuracy(weights: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Share of rows whose top weight (lowest index on ties) is their true task."""
    _check_weights(weights, "routing_accuracy")
    if not isinstance(true_labels, torch.Tensor) or true_labels.shape != (weights.shape[0],):
        got = list(true_labels.shape) if isinstance(true_labels, torch.Tensor) else type(true_labels).__name__
        raise MergeflowError(f"routing_accuracy: labels must be a [{weights.shape[0]}] tensor, got {got}")
    if weights.shape[0] == 0:
        raise MergeflowError("routing_accuracy: empty batch")
    hits = _top(weights) == true_labels.to(weights.device, torch.int64)
    return float(hits.double().mean())


def group_rows(weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Identical weight rows grouped (exact equality), in order of first occurrence: [(row, indices)]."""
    _check_weights(weights, "group_rows")
    b = weights.shape[0]
    if b == 0:
        return []
    _, inverse = torch.unique(weights, dim=0, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    positions = torch.arange(b, device=weights.device)
    first = torch.full((n_groups,), b, dtype=torch.int64, device=weights.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(n_groups, device=weights.device)
    order = torch.argsort(rank[inverse], stable=True)  # rows grouped by first occurrence, ascending within
    sizes = torch.bincount(rank[inverse], minlength=n_groups).tolist()
    return [(weights[idx[0]], idx) for idx in torch.split(order, sizes)]


# --- evaluation ---------------------------------------------------------------------


def evaluate_autoswitch(
    folder: Path, tasks: list[str], meta: dict, fam, base_sd: dict[str, torch.Tensor], data: dict, seed: int
) -> dict:
    """Auto-Switch (its switches and query set in ``folder``) on shuffled mixed-task test batches, in every routing mode.

    Each input is routed by the base model's features (the family's ``features``); in each batch
    every distinct switch combination is applied once, in place, to one model
    (``mergeflow.runtime``), and each input is scored with its own task's head and metric.
    Returns {mode: ({task: score dict}, routing accuracy)}.
    """
    from mergeflow.codecs.switch import SWITCH_SUFFIX, load_switch
    from mergeflow.runtime import SwitchRuntime

    queries = QuerySet.load(folder / QUERIES_NAME)
    if queries.tasks != tasks:
        raise MergeflowError(f"{folder / QUERIES_NAME}: query set tasks {queries.tasks} differ from {tasks}")
    switches = {t: load_switch(folder / f"{t}{SWITCH_SUFFIX}") for t in tasks}
    model = fam.build({k: v.clone() for k, v in base_sd.items()})
    runtime = SwitchRuntime(fam.tensors(model), switches, workers=1)  # small models: no thread hand-offs
    task_of = torch.cat([torch.full((len(data[t]),), i) for i, t in enumerate(tasks)])
    row_of = torch.cat([torch.arange(len(data[t])) for t in tasks])
    order = torch.randperm(len(task_of), generator=torch.Generator().manual_seed(seed))
    routed = route(queries, torch.cat([fam.features(model, data[t]) for t in tasks]), meta["k"])
    results = {}
    for mode in MODES:
        outputs: dict[str, list] = {t: [] for t in tasks}
        weights_all = torch.empty_like(routed)
        try:
            for start in range(0, len(order), meta["batch_size"]):
                rows = order[start : start + meta["batch_size"]]
                weights = combine(routed[rows], mode)
                weights_all[rows] = weights
                for w, idx in group_rows(weights):
                    sel = rows[idx]
                    runtime.switch({t: float(w[i]) for i, t in enumerate(tasks) if float(w[i]) != 0.0})  # one pass
                    for i, t in enumerate(tasks):
                        mine = row_of[sel[task_of[sel] == i]]
                        if len(mine):
                            outputs[t].append((mine, fam.predict(model, t, data[t], mine)))
        finally:
            runtime.remove()
        scores = {}
        for t in tasks:
            rows_t = torch.cat([r for r, _ in outputs[t]])
            outs = torch.cat([o for _, o in outputs[t]])
            ordered = torch.empty_like(outs)
            ordered[rows_t] = outs
            scores[t] = fam.score(t, ordered, data[t])
        results[mode] = (scores, routing_accuracy(weights_all, task_of))
    return results
