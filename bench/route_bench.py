"""Auto-Switch routing throughput: ``mergeflow.autoswitch.route`` against scikit-learn's k-NN.

Routing an input = its k nearest queries (Euclidean) among ``tasks x queries`` embedded train
samples, and the share of each task among them. The peer computes the same weights with
``sklearn.neighbors.KNeighborsClassifier(algorithm="brute").predict_proba`` (uniform weights:
each neighbour votes 1/k). Inputs and queries are CLIP ViT-B/32-sized embeddings (512 floats,
L2-normalised), drawn around one centre per task so that routing is not trivial.

Prints inputs per second for each (best of --repeat), the ratio, and how many rows of weights
agree exactly (neighbour ties at equal distance may break differently). Examples::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/route_bench.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/route_bench.py --queries 1000 --batch 1024
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mergeflow.autoswitch import QuerySet, route  # noqa: E402


def embeddings(centres: torch.Tensor, per_task: int, spread: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_task`` normalised points around each task's centre, and their task."""
    n_tasks, dim = centres.shape
    labels = torch.arange(n_tasks).repeat_interleave(per_task)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen) / dim**0.5
    return torch.nn.functional.normalize(points, dim=-1), labels


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--queries", type=int, default=100, help="queries per task (the pipeline's compress.queries)")
    ap.add_argument("--dim", type=int, default=512, help="embedding size (CLIP ViT-B/32: 512)")
    ap.add_argument("--batch", type=int, default=4096, help="inputs routed per call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--spread", type=float, default=1.0, help="noise norm around each task's centre (unit vectors about 1.4 apart)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(args.tasks, args.dim, generator=gen), dim=-1)
    q_emb, q_lab = embeddings(centres, args.queries, args.spread, gen)
    x, x_lab = embeddings(centres, -(-args.batch // args.tasks), args.spread, gen)
    perm = torch.randperm(len(x), generator=gen)[: args.batch]  # a mixed-task batch
    x, x_lab = x[perm], x_lab[perm]
    queries = QuerySet(q_emb, q_lab, [f"task{i}" for i in range(args.tasks)])

    ours = route(queries, x, args.k)
    t_ours = best(lambda: route(queries, x, args.k), args.repeat)
    print(
        f"{args.batch} inputs, {len(q_lab)} queries ({args.tasks} tasks x {args.queries}), dim {args.dim}, k {args.k}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'router':<44} {'ms':>9} {'inputs/s':>12} {'ratio':>7}")
    print(f"{'mergeflow.autoswitch.route':<44} {1e3 * t_ours:>9.2f} {args.batch / t_ours:>12,.0f} {1.0:>7.2f}")
    try:
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:  # pragma: no cover - scikit-learn is a dependency (the zoo's digits)
        print("scikit-learn not installed: no peer")
        return
    knn = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute").fit(q_emb.numpy(), q_lab.numpy())
    xn = x.numpy()
    theirs = torch.from_numpy(knn.predict_proba(xn)).float()
    t_peer = best(lambda: knn.predict_proba(xn), args.repeat)
    print(
        f"{'sklearn KNeighborsClassifier (brute) proba':<44} {1e3 * t_peer:>9.2f} {args.batch / t_peer:>12,.0f} "
        f"{t_peer / t_ours:>7.2f}"
    )
    same = (ours == theirs).all(dim=1).float().mean().item()
    top = (ours.argmax(1) == x_lab).float().mean().item()
    print(
        f"ratio = peer time / ours. Rows of weights equal to the peer's: {same:.4f}; routing accuracy of these inputs: {top:.4f}"
    )


if __name__ == "__main__":
    main()
