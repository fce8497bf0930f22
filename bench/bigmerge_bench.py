#!/usr/bin/env python
"""Peak memory of a merge whose inputs total more than half of the machine's RAM.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bigmerge_bench.py                   # task_arithmetic
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bigmerge_bench.py --methods task_arithmetic,ties --keep

Reads MemTotal from /proc/meminfo, sizes a LLaMA (TinyLlama's width, as many layers as needed)
so that base + 4 fine-tunes in --dtype (default bf16) total more than --input-frac (default 0.55) of it, generates
them by streaming (tensor by tensor: the generator stays small; its own peak RSS is printed),
runs ``mergeflow merge`` on them and reports wall time and peak RSS as a share of RAM.
Target (issue 3): peak RSS < RAM / 4. The generated files (and outputs) are deleted at the
end unless --keep; a kept set is reused by the next run.

Peak RSS is the process's ``ru_maxrss`` (as ``/usr/bin/time -v`` reports it), which includes
the pages of mmap'ed safetensors inputs that the process has touched; "anon" is the polled
peak of private memory (RssAnon), the part the kernel cannot reclaim. The inputs are not
pre-read: whatever of them is in the page cache from the generation is there.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from llama_ckpt import DTYPES, generate, spec_with_bytes  # noqa: E402
from measure import drop_writeback, run_measured  # noqa: E402

SETS = {"task_arithmetic": ["scaling=0.3"], "ties": ["density=0.2", "scaling=1.0"]}


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="task_arithmetic")
    ap.add_argument("--finetunes", type=int, default=4)
    ap.add_argument("--input-frac", type=float, default=0.55, help="inputs total at least this share of RAM (default 0.55)")
    ap.add_argument("--ram-bytes", type=int, help="pretend RAM is this many bytes (default: MemTotal)")
    ap.add_argument("--delta", type=float, default=0.02)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="dtype of the generated models (float32: about half the layers for the same bytes)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-shards", type=int, default=4, help="shards of the base (a 2-3 GB model is usually sharded)")
    ap.add_argument("--workdir", type=Path, default=HERE / ".work")
    ap.add_argument("--mergeflow", type=Path, default=REPO / ".venv/bin/mergeflow")
    ap.add_argument("--keep", action="store_true", help="keep the generated models (reused next time)")
    ap.add_argument(
        "--rss-limit-frac",
        type=float,
        default=0.5,
        help="kill a merge whose RSS passes this share of RAM, to spare a shared machine (default 0.5; 0: none)",
    )
    args = ap.parse_args(argv)

    ram = args.ram_bytes or mem_total()
    target = int(args.input_frac * ram) + 1
    spec = spec_with_bytes(-(-target // (1 + args.finetunes)), dtype=args.dtype)
    print(
        f"# RAM {ram / 2**30:.1f} GiB; inputs must exceed {args.input_frac:.0%} of it = {target / 2**30:.1f} GiB: "
        f"{1 + args.finetunes} models of {spec.n_params() / 1e9:.2f}B params ({spec.num_hidden_layers} layers, "
        f"hidden {spec.hidden_size}) in {spec.dtype}, {spec.n_bytes() / 2**30:.2f} GiB each",
        flush=True,
    )

    t0 = time.perf_counter()
    ms = generate(args.workdir / "models", spec, args.finetunes, args.delta, args.seed, args.base_shards)
    gen_s = time.perf_counter() - t0
    gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nbytes = ms.total_bytes()
    print(
        f"# inputs {nbytes / 2**30:.2f} GiB = {nbytes / ram:.0%} of RAM; generation {gen_s:.0f} s, "
        f"generator peak RSS {gen_rss / 2**20:.0f} MiB",
        flush=True,
    )
    if nbytes <= 0.5 * ram:
        print("!! inputs do not exceed half of RAM", flush=True)

    from merge_bench import warm_kernels

    print(f"# mergeflow kernel warm-up: {warm_kernels(args.mergeflow):.1f} s (first use after an install compiles)", flush=True)
    rows, ok = [], True
    try:
        for method in [m for m in args.methods.split(",") if m]:
            out = args.workdir / "out" / f"big-{method}"
            shutil.rmtree(out, ignore_errors=True)
            sets = [x for s in SETS[method] for x in ("--set", s)]
            cmd = [
                str(args.mergeflow),
                "merge",
                "--method",
                method,
                "--base",
                str(ms.base),
                "--out",
                str(out),
                *sets,
                "--device",
                "cpu",
                *map(str, ms.finetunes),
            ]
            drop_writeback()
            r = run_measured(cmd, args.workdir / f"big-{method}.log", rss_limit=int(args.rss_limit_frac * ram) or None)
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.exists() else 0
            ok &= r.rc == 0
            rows.append((method, r, out_bytes))
            print(
                f"   {method}: rc {r.rc}, {r.wall_s:.1f} s, peak RSS {r.peak / 2**20:.0f} MiB "
                f"(anon {r.anon_rss / 2**20:.0f} MiB){' KILLED at the RSS limit' if r.killed else ''}",
                flush=True,
            )
            if r.rc != 0:
                print("   " + "\n   ".join(r.log.read_text(errors="replace").strip().splitlines()[-5:]))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(ms.root, ignore_errors=True)

    print(
        f"\n## big merge: {1 + args.finetunes} x {spec.n_params() / 1e9:.2f}B-param LLaMA ({spec.dtype}), inputs "
        f"{nbytes / 2**30:.2f} GiB ({nbytes / ram:.0%} of {ram / 2**30:.1f} GiB RAM)"
    )
    hdr = (
        f"{'method':<16} {'rc':>3} {'wall s':>8} {'GB/s in':>8} {'peak RSS MiB':>13} {'anon MiB':>9} "
        f"{'peak/RAM':>9} {'anon/RAM':>9}  target peak < RAM/4"
    )
    print(hdr)
    print("-" * len(hdr))
    for method, r, out_bytes in rows:
        print(
            f"{method:<16} {'kill' if r.killed else r.rc:>3} {r.wall_s:>8.1f} {nbytes / r.wall_s / 1e9:>8.2f} {r.peak / 2**20:>13.0f} "
            f"{r.anon_rss / 2**20:>9.0f} {r.peak / ram:>8.1%} {r.anon_rss / ram:>8.1%}  "
            f"{'MET' if r.rc == 0 and r.peak < ram / 4 else 'NOT MET'}"
        )
    print(
        f"(generator: {gen_s:.0f} s, peak RSS {gen_rss / 2**20:.0f} MiB; files "
        f"{'kept in ' + str(ms.root) if args.keep else 'deleted'})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
