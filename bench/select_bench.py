#!/usr/bin/env python
"""Selection throughput: mergeflow.select against torch.kthvalue and the machine's copy bandwidth.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/select_bench.py            # 64M float32, keeps 20% and 60%
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/select_bench.py --n 4M     # quick
    ... --baselines kthvalue,topk,sort                                         # add the slow baselines

For each input (|normal|, |normal| rounded to bfloat16 = many ties, and a sparse one that is half
zeros) and each keep fraction q (k = int(q * n) entries of largest magnitude), it times

  kth_largest   mergeflow.select.kth_largest(x, k): the exact k-th largest value (the threshold)
  topk_mask     mergeflow.select.topk_mask(x, k): the threshold plus the mask x >= threshold
  kthvalue      torch.kthvalue(x, n - k + 1): the (n-k+1)-th smallest, i.e. the k-th largest
  topk / sort   torch.topk(x, k).values.min() / torch.sort(x).values[n - k] (optional)

and checks exactness: every threshold is bitwise equal to torch.kthvalue's, the kept count
(x >= thr).sum() agrees, topk_mask(x, k).sum() equals it, it is >= k, and (x > thr).sum() < k
(so ties at the threshold are kept, and nothing above it is missed).

Throughput is input bytes / time. The copy bandwidth is bytes copied / time for dst.copy_(src)
(torch, all threads) and numpy.copyto (one thread) on a buffer of --copy-mb, best of --repeat;
"% of copy" is selection throughput / copy throughput, i.e. how many tensor copies' worth of time
a selection costs (100% = as fast as copying the tensor once). All ratios come from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mergeflow.select import kth_largest, topk_mask  # noqa: E402


def parse_count(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int, device: torch.device):
    """(best seconds, median seconds, last result) over ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def make_inputs(n: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    inputs = {"normal": x.abs()}
    inputs["bf16-ties"] = x.bfloat16().float().abs()  # a few thousand distinct values: heavy ties
    sparse = x.abs()
    sparse[torch.rand(n, generator=g) < 0.5] = 0.0  # half zeros: q=60% threshold is 0
    inputs["sparse-50%"] = sparse
    del x
    return {k: v.to(device) for k, v in inputs.items()}


def copy_bandwidth(mb: int, repeat: int, device: torch.device) -> dict[str, float]:
    """Bytes copied per second, best of ``repeat``: torch copy_ (all threads) and numpy (1 thread)."""
    n = mb * (1 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best, _, _ = timed(lambda: dst.copy_(src), repeat, device)
    out = {"torch copy_": src.numel() * 4 / best}
    if device.type == "cpu":
        s, d = src.numpy(), dst.numpy()
        best, _, _ = timed(lambda: np.copyto(d, s), repeat, device)
        out["numpy copyto (1 thread)"] = src.numel() * 4 / best
        # one streaming read pass, the floor for any exact method (it must look at every value)
        best, _, _ = timed(lambda: np.count_nonzero(s >= 0.5), repeat, device)
        out["count pass (x >= t)"] = src.numel() * 4 / best
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="64M", help="elements per tensor (suffix K/M/G = 2^10/2^20/2^30); default 64M")
    ap.add_argument("--keep", default="0.2,0.6", help="keep fractions q (k = int(q*n)); default 0.2,0.6")
    ap.add_argument("--inputs", default="normal,bf16-ties,sparse-50%", help="which inputs")
    ap.add_argument("--baselines", default="kthvalue", help="comma list of kthvalue,topk,sort (topk/sort are slow)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per cell; best is reported (default 3)")
    ap.add_argument("--copy-mb", type=int, default=512, help="copy-bandwidth buffer size in MiB (default 512)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    n = parse_count(args.n)
    keeps = [float(q) for q in args.keep.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    if "kthvalue" not in baselines:
        baselines.insert(0, "kthvalue")  # the reference for exactness and for the headline ratio

    print(f"# select_bench: n={n:,} float32 ({n * 4 / 2**20:.0f} MiB), keeps {keeps}, repeat {args.repeat}, device {device}")
    print(
        f"# torch {torch.__version__}, numpy {np.__version__}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, {platform.processor() or platform.machine()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )

    bw = copy_bandwidth(args.copy_mb, max(args.repeat, 5), device)
    print("\n## machine")
    for name, v in bw.items():
        print(f"  {name:<26} {v / 1e9:8.2f} GB/s")
    copy_bw = bw["torch copy_"]
    copy_bw1 = bw.get("numpy copyto (1 thread)", copy_bw)

    inputs = make_inputs(n, args.seed, device)
    nbytes = n * 4
    rows, ok_all = [], True
    for iname in args.inputs.split(","):
        x = inputs[iname]
        for q in keeps:
            k = max(1, int(q * n))
            cells = {}
            cells["kth_largest"] = timed(lambda: kth_largest(x, k), args.repeat, device)
            cells["topk_mask"] = timed(lambda: topk_mask(x, k), args.repeat, device)
            cells["kthvalue"] = timed(lambda: torch.kthvalue(x, n - k + 1).values, args.repeat, device)
            if "topk" in baselines:
                cells["topk"] = timed(lambda: torch.topk(x, k, sorted=False).values.min(), args.repeat, device)
            if "sort" in baselines:
                cells["sort"] = timed(lambda: torch.sort(x).values[n - k], args.repeat, device)

            ref = cells["kthvalue"][2]
            thr = cells["kth_largest"][2]
            kept = int((x >= ref).sum())
            above = int((x > ref).sum())
            mask_kept = int(cells["topk_mask"][2].sum())
            same_thr = all(
                bool(c[2].view(torch.int32) == ref.view(torch.int32)) for name, c in cells.items() if name != "topk_mask"
            )
            exact = same_thr and int((x >= thr).sum()) == kept and mask_kept == kept and kept >= k and above < k
            ok_all &= exact
            rows.append((iname, q, k, float(ref), kept, cells, exact))
            del cells

    print("\n## selection (best of %d; GB/s = input bytes / time; %%copy = GB/s / torch copy_ GB/s)" % args.repeat)
    hdr = f"{'input':<11} {'q':>4} {'threshold':>12} {'kept-k':>8} {'method':<12} {'best s':>8} {'median s':>9} {'GB/s':>7} {'%copy':>6} {'%copy1t':>7}  {'kthvalue/x':>10}"
    print(hdr)
    print("-" * len(hdr))
    speedups = []
    for iname, q, k, ref, kept, cells, exact in rows:
        t_ref = cells["kthvalue"][0]
        for i, (name, (best, med, _)) in enumerate(cells.items()):
            gbs = nbytes / best
            lead = f"{iname:<11} {q:>4.2f} {ref:>12.6g} {kept - k:>8d}" if i == 0 else " " * 38
            print(
                f"{lead} {name:<12} {best:>8.4f} {med:>9.4f} {gbs / 1e9:>7.2f} {100 * gbs / copy_bw:>5.1f}% "
                f"{100 * gbs / copy_bw1:>6.1f}%  {t_ref / best:>9.1f}x"
            )
        print(f"{'':<38} exact: {'yes' if exact else 'NO'} (same threshold bits as kthvalue, same kept count, ties kept)")
        speedups.append(
            (iname, q, t_ref / cells["kth_largest"][0], t_ref / cells["topk_mask"][0], nbytes / cells["kth_largest"][0] / copy_bw)
        )

    print("\n## summary: speed-up over torch.kthvalue (target >= 10x, exact)")
    print(f"{'input':<11} {'q':>4} {'kth_largest':>12} {'topk_mask':>10} {'kth_largest %copy':>18}")
    for iname, q, s1, s2, frac in speedups:
        print(f"{iname:<11} {q:>4.2f} {s1:>11.1f}x {s2:>9.1f}x {100 * frac:>17.1f}%")
    worst = min(s[2] for s in speedups)
    print(
        f"\nworst kth_largest speed-up {worst:.1f}x; all exact: {'yes' if ok_all else 'NO'}; "
        f"target (>= 10x and exact): {'MET' if worst >= 10 and ok_all else 'NOT MET'}"
    )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
