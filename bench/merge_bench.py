#!/usr/bin/env python
"""mergeflow against mergekit on LLaMA-architecture checkpoints this script makes itself.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/merge_bench.py                 # ~166M-param models, TA + TIES
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/merge_bench.py --size small    # quick smoke run (~20M)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/merge_bench.py --dtype float32 # float32 inputs (83M params, same bytes)
    ... --methods ties --tools mergeflow,mergekit --base-shards 2 --repeat 3

1. Generates (once; cached under --workdir keyed by size/dtype/seed/delta/sharding) a random
   LLaMA base in Hugging Face layout and 4 fine-tunes = base + small random deltas, stored in
   --dtype (bfloat16 by default; float32 presets have half the layers and half the vocabulary,
   so about the same bytes per file).
2. Installs mergekit into its own venv (--mergekit-venv, default bench/.venv-mergekit) if absent.
3. Reads all inputs twice (the second read, from the page cache, is printed for context), then
   for each method runs each tool as a subprocess with warm inputs and flushed write-back,
   measuring wall time and peak RSS (see bench/measure.py), and writes into a fresh directory.
4. Compares merged tensors tensor by tensor (lazily) against each other and against a float32
   reference computed here from METHODS.md's definition (and, for TIES, from mergekit's exact-k
   trim), so a difference can be attributed to semantics or to arithmetic.

Tools:
  mergeflow       .venv/bin/mergeflow merge --device cpu (works in float32, writes the base dtype)
  mergekit        mergekit-yaml with ``dtype: float32, out_dtype: <input dtype>``: the same
                  arithmetic precision as mergeflow (the matching-semantics comparison; the
                  headline ratios)
  mergekit-native mergekit-yaml without ``dtype``: computes in the inputs' bf16 (mergekit's
                  default; faster for it, but its bf16 sums of task vectors are less exact).
                  bf16 only: with float32 inputs it is the same run as "mergekit" and is dropped.

Agreement: with bf16 inputs TIES cannot agree to 1e-3 across tools, because the tie rules differ
(exactly-k trim vs every entry at the threshold; +1 vs 0 on an exact zero sum) and bf16 task
vectors tie massively; the summary then reads each tool against the reference of its own rule.
With --dtype float32 ties and exact zero sums (nearly) vanish, the rules coincide, and the
direct mergeflow-vs-mergekit rel_l2 is the agreement figure for both methods.

Ratios: time = mergekit wall / mergeflow wall (higher is better for mergeflow);
        RSS  = mergeflow peak / mergekit peak (lower is better for mergeflow).
Targets (issue 3): Task Arithmetic >= 3x, TIES >= 10x faster, RSS ratio <= 0.5, rel diff <= 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from llama_ckpt import DTYPES, PRESETS, generate, preset, read_all  # noqa: E402
from measure import LazyCkpt, drop_writeback, run_measured  # noqa: E402

MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]  # torch pinned exactly: an open range pulls a multi-GB CUDA build

METHODS = {
    # name: (mergeflow --set args, mergekit method, mergekit global parameters, per-model parameters)
    "task_arithmetic": (["scaling=0.3"], "task_arithmetic", {"lambda": 0.3, "normalize": False}, {"weight": 1.0}),
    "ties": (["density=0.2", "scaling=1.0"], "ties", {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}),
}
TARGET_SPEEDUP = {"task_arithmetic": 3.0, "ties": 10.0}


def _ok(flag: bool) -> str:
    return "MET" if flag else "NOT MET"


def _pct(frac: float) -> str:
    """A share as a percentage; tiny nonzero shares (a few float32 ties) in scientific notation."""
    return f"{100 * frac:.3f}%" if frac == 0 or frac >= 1e-5 else f"{100 * frac:.1e}%"


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- mergekit


def ensure_mergekit(venv: Path) -> str:
    """Create the mergekit venv if absent; returns mergekit's version."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        log(f"installing mergekit into {venv} (a few minutes) ...")
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "--quiet", *MERGEKIT_PINS], check=True)
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def mergekit_config(method: str, base: Path, finetunes: list[Path], dtype: str | None, out_dtype: str) -> str:
    _, mk_method, global_params, model_params = METHODS[method]
    import yaml

    cfg = {
        "merge_method": mk_method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": dict(model_params)} for p in finetunes],
        "parameters": dict(global_params),
    }
    if dtype:
        cfg["dtype"] = dtype
        cfg["out_dtype"] = out_dtype
    return yaml.safe_dump(cfg, sort_keys=False)


def tool_command(tool: str, method: str, ms, out: Path, work: Path, args) -> list[str]:
    if tool == "mergeflow":
        sets = [x for s in METHODS[method][0] for x in ("--set", s)]
        return [
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
    dtype = "float32" if tool == "mergekit" else None
    cfg = work / f"{method}-{tool}.yml"
    cfg.write_text(mergekit_config(method, ms.base, ms.finetunes, dtype, ms.spec.dtype))
    return [str(args.mergekit_venv / "bin/mergekit-yaml"), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"]


# ------------------------------------------------------------------------------------ references


def _trimmed(taus: list[torch.Tensor], exact_k: bool, density: float = 0.2) -> torch.Tensor:
    out = []
    for t in taus:
        w, n = t.abs().reshape(-1), t.numel()
        if exact_k:  # mergekit's sparsify.magnitude
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.argsort(w, descending=True)[: max(1, int(density * n))]] = True
        else:  # every entry >= the k-th largest magnitude (torch.kthvalue, independent of mergeflow.select)
            k = int(density * n)
            mask = w >= torch.kthvalue(w, n - k + 1).values if k >= 1 else torch.zeros(n, dtype=torch.bool)
        out.append(t * mask.reshape(t.shape))
    return torch.stack(out)


def reference(
    method: str,
    base: torch.Tensor,
    fts: list[torch.Tensor],
    exact_k: bool = False,
    plus_on_zero: bool = False,
    cache: dict | None = None,
) -> torch.Tensor:
    """METHODS.md's definition in float32, rounded to the base dtype. TIES variants as mergekit
    computes it: ``exact_k`` trims to exactly k = max(1, int(density*n)) entries by a descending
    argsort (ties at the threshold broken arbitrarily) instead of keeping every entry >= the k-th
    largest; ``plus_on_zero`` elects sign +1 where the trimmed sum is exactly 0 (METHODS.md: sign 0,
    so the entry keeps the base value)."""
    cache = {} if cache is None else cache
    b = base.float()
    taus = [f.float() - b for f in fts]
    if method == "task_arithmetic":
        out = b + 0.3 * torch.stack(taus).sum(0)
    else:
        key = ("trimmed", exact_k)
        if key not in cache:
            cache[key] = _trimmed(taus, exact_k)
        s = cache[key]
        total = s.sum(0)
        gamma = torch.where(total >= 0, 1.0, -1.0) if plus_on_zero else torch.sign(total)
        agree = (s * gamma) > 0
        mean = (s * agree).sum(0) / agree.sum(0).clamp(min=1)
        out = b + 1.0 * mean
    return out.to(base.dtype)


# ------------------------------------------------------------------------------------ comparison


def compare_many(ms, sources: dict, pairs: list[tuple[str, str]]) -> dict:
    """Per pair (a, b): max over tensors of ||a-b||/||b||, of max|a-b|/max|b|, of
    ||a-b|| / ||b - base|| (relative to the merge's change), and the share of elements that
    differ. ``sources`` maps a label to a callable (name, cache) -> tensor."""
    basec = LazyCkpt(ms.base)
    fts = [LazyCkpt(p) for p in ms.finetunes]
    stats = {
        p: {
            "rel_l2": 0.0,
            "worst": "",
            "rel_max": 0.0,
            "rel_delta": 0.0,
            "ndiff": 0,
            "n": 0,
            "sq_d": 0.0,
            "sq_b": 0.0,
            "sq_ch": 0.0,
            "rel_l2_2d": 0.0,
        }
        for p in pairs
    }
    need = {x for p in pairs for x in p}
    for name in basec.names():
        cache = {"base": basec.get(name), "fts": None, "_fts": fts}
        vals = {lab: sources[lab](name, cache) for lab in need}
        b0 = cache["base"].double()
        for pa, pb in pairs:
            ta, tb = vals[pa], vals[pb]
            st = stats[(pa, pb)]
            st["ndiff"] += int((ta != tb).sum())
            st["n"] += ta.numel()
            a, b = ta.double(), tb.double()
            d = a - b
            nd, nb = float(d.norm()), float(b.norm())
            r = nd / nb if nb else float(nd > 0) * float("inf")
            if r > st["rel_l2"]:
                st["rel_l2"], st["worst"] = r, name
            if ta.dim() >= 2:
                st["rel_l2_2d"] = max(st["rel_l2_2d"], r)
            st["sq_d"] += nd * nd
            st["sq_b"] += nb * nb
            mb = float(b.abs().max())
            st["rel_max"] = max(st["rel_max"], float(d.abs().max()) / mb if mb else float(nd > 0) * float("inf"))
            ch = float((b - b0).norm())
            st["sq_ch"] += ch * ch
            st["rel_delta"] = max(st["rel_delta"], nd / ch if ch else float(nd > 0) * float("inf"))
    for st in stats.values():
        st["frac_diff"] = st["ndiff"] / max(st["n"], 1)
        st["model_l2"] = (st["sq_d"] / st["sq_b"]) ** 0.5 if st["sq_b"] else 0.0
        st["model_delta"] = (st["sq_d"] / st["sq_ch"]) ** 0.5 if st["sq_ch"] else 0.0
    return stats


def ckpt_source(path: Path):
    ck = LazyCkpt(path)
    return lambda name, cache: ck.get(name)


def ref_source(method: str, exact_k: bool = False, plus_on_zero: bool = False):
    def get(name, cache):
        if cache["fts"] is None:
            cache["fts"] = [f.get(name) for f in cache["_fts"]]
        return reference(method, cache["base"], cache["fts"], exact_k, plus_on_zero, cache)

    return get


# ------------------------------------------------------------------------------------------ main


def warm_kernels(mergeflow_exe: Path) -> float:
    """Compile (or load) mergeflow's fused kernels once, in the interpreter the timed runs use."""
    python = Path(mergeflow_exe).parent / "python"
    out = subprocess.run(
        [str(python), "-c", "from mergeflow import kernels; print(kernels.warm())"], check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        default="medium",
        choices=sorted(PRESETS),
        help="model preset (default medium: ~166M params in bf16, ~83M in float32, ~332 MB per file)",
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="dtype of the generated base and fine-tunes (default bfloat16; float32: ties at the TIES "
        "threshold nearly vanish, so mergekit's and METHODS.md's tie rules coincide)",
    )
    ap.add_argument("--finetunes", type=int, default=4)
    ap.add_argument("--delta", type=float, default=0.02, help="fine-tune delta std relative to each tensor's RMS (default 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-shards", type=int, default=1, help="write the base in this many shards (+ index)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument(
        "--tools",
        default="mergeflow,mergekit,mergekit-native",
        help="default mergeflow,mergekit,mergekit-native (mergekit-native is dropped for float32 inputs)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the best wall time is kept")
    ap.add_argument("--no-reference", action="store_true", help="skip the float32 reference merges (faster)")
    ap.add_argument("--workdir", type=Path, default=HERE / ".work")
    ap.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit")
    ap.add_argument("--mergeflow", type=Path, default=REPO / ".venv/bin/mergeflow")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    if args.dtype != "bfloat16" and "mergekit-native" in tools:
        # mergekit-native computes in the inputs' dtype: for float32 inputs that is the "mergekit" run
        tools.remove("mergekit-native")
        if "mergekit" not in tools:
            tools.append("mergekit")
        log(f"# {args.dtype} inputs: mergekit-native = mergekit (dtype float32, out_dtype {args.dtype}); running 'mergekit' only")
    args.workdir.mkdir(parents=True, exist_ok=True)
    mk_version = ensure_mergekit(args.mergekit_venv) if any(t.startswith("mergekit") for t in tools) else "-"
    spec = preset(args.size, args.dtype)
    ms = generate(args.workdir / "models", spec, args.finetunes, args.delta, args.seed, args.base_shards, log=log)
    files = ms.files()
    read_all(files)
    nbytes, t_read = read_all(files)
    mem_total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    log(
        f"# {spec.n_params() / 1e6:.1f}M params per model ({spec.n_bytes() / 1e6:.0f} MB in {spec.dtype}: hidden "
        f"{spec.hidden_size}, {spec.num_hidden_layers} layers, vocab {spec.vocab_size}), base + {args.finetunes} "
        f"fine-tunes, base in {args.base_shards} shard(s); inputs {nbytes / 1e9:.2f} GB"
    )
    log(f"# read all inputs once from the page cache: {t_read:.3f} s ({nbytes / t_read / 1e9:.1f} GB/s)")
    log(
        f"# mergeflow kernel warm-up: {warm_kernels(args.mergeflow):.1f} s (numba compiles them on first use after an "
        "install and caches them on disk; each later process loads them in ~0.6 s, inside the timed runs)"
    )
    log(
        f"# mergekit {mk_version} ({args.mergekit_venv}), torch {torch.__version__}, cpus {os.cpu_count()}, "
        f"RAM {mem_total / 2**30:.1f} GiB, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )

    out_root = args.workdir / "out"
    results, diffs = {}, {}
    for method in methods:
        for tool in tools:
            out = out_root / f"{method}-{tool}"
            best = None
            for rep in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                cmd = tool_command(tool, method, ms, out, args.workdir, args)
                read_all(files)  # inputs warm in the page cache for every tool
                drop_writeback()
                r = run_measured(cmd, args.workdir / f"{method}-{tool}.log")
                if r.rc != 0:
                    tail = r.log.read_text(errors="replace").strip().splitlines()[-5:]
                    log(f"!! {tool} {method} failed (rc {r.rc}); log {r.log}:\n   " + "\n   ".join(tail))
                    best = r
                    break
                log(
                    f"   {method:<16} {tool:<16} run {rep + 1}: {r.wall_s:7.2f} s, peak RSS {r.peak / 2**20:7.0f} MiB "
                    f"(anon {r.anon_rss / 2**20:.0f} MiB)"
                )
                if best is None or r.wall_s < best.wall_s:
                    best = r
            results[(method, tool)] = best

        ok = [t for t in tools if results[(method, t)].rc == 0]
        sources = {t: ckpt_source(out_root / f"{method}-{t}") for t in ok}
        pairs = [("mergeflow", t) for t in ok if t != "mergeflow" and "mergeflow" in ok]
        if not args.no_reference:
            sources["ref"] = ref_source(method)
            pairs += [(t, "ref") for t in ok]
            if method == "ties":  # attribute mergekit's difference: trim to exactly k, and sign + on a zero sum
                sources["ref-mk"] = ref_source(method, exact_k=True, plus_on_zero=True)
                sources["ref-exact-k"] = ref_source(method, exact_k=True)
                sources["ref-plus0"] = ref_source(method, plus_on_zero=True)
                pairs += [(t, "ref-mk") for t in ok if t.startswith("mergekit")]
                pairs += [("ref-exact-k", "ref"), ("ref-plus0", "ref"), ("ref-mk", "ref")]
        if pairs:
            t0 = time.perf_counter()
            diffs[method] = compare_many(ms, sources, pairs)
            log(f"   compared {method} outputs in {time.perf_counter() - t0:.1f} s")
        if not args.keep_outputs:
            for t in tools:
                shutil.rmtree(out_root / f"{method}-{t}", ignore_errors=True)

    # ---- report
    print()
    print(
        f"## merge: {args.finetunes} fine-tunes of a {spec.n_params() / 1e6:.0f}M-param LLaMA ({spec.dtype}, "
        f"{spec.n_bytes() / 1e6:.0f} MB per model, {nbytes / 1e9:.2f} GB of inputs; page-cache read of all inputs "
        f"{t_read:.2f} s)"
    )
    hdr = f"{'method':<16} {'tool':<16} {'wall s':>8} {'peak RSS MiB':>13} {'anon MiB':>9} {'x read':>7} {'mergekit/mf time':>17} {'mf/mergekit RSS':>16}"
    print(hdr)
    print("-" * len(hdr))
    verdict = []
    for method in methods:
        mf = results.get((method, "mergeflow"))
        for tool in tools:
            r = results[(method, tool)]
            if r.rc != 0:
                print(f"{method:<16} {tool:<16} {'FAILED rc ' + str(r.rc):>8}   (log {r.log})")
                continue
            tr = rr = ""
            if tool != "mergeflow" and mf is not None and mf.rc == 0:
                tr = f"{r.wall_s / mf.wall_s:.1f}x"
                rr = f"{mf.peak / r.peak:.2f}"
            print(
                f"{method:<16} {tool:<16} {r.wall_s:>8.2f} {r.peak / 2**20:>13.0f} {r.anon_rss / 2**20:>9.0f} "
                f"{r.wall_s / t_read:>6.0f}x {tr:>17} {rr:>16}"
            )
        mk = results.get((method, "mergekit"))
        if mf is not None and mk is not None and mf.rc == 0 and mk.rc == 0:
            per = diffs.get(method, {})
            raw = per.get(("mergeflow", "mergekit"), {}).get("rel_l2", float("nan"))
            sp, rss = mk.wall_s / mf.wall_s, mf.peak / mk.peak
            line = (
                f"{method}: {sp:.1f}x faster (target >= {TARGET_SPEEDUP[method]:g}x: {_ok(sp >= TARGET_SPEEDUP[method])}), "
                f"RSS ratio {rss:.2f} (target <= 0.5: {_ok(rss <= 0.5)}), rel_l2 mergeflow vs mergekit {raw:.1e} "
                f"(target <= 1e-3: {_ok(raw <= 1e-3)})"
            )
            if spec.dtype != "bfloat16":
                # float32 inputs: ties at the threshold and exact zero sums (nearly) vanish, so the
                # direct comparison above is the agreement figure; the references only confirm it
                line += f" [{spec.dtype} inputs: the direct difference is the agreement figure]"
                if ("mergekit", "ref-mk") in per:
                    tie = per[("ref-mk", "ref")]["rel_l2"]
                    own = max(per[("mergeflow", "ref")]["rel_l2"], per[("mergekit", "ref")]["rel_l2"])
                    line += (
                        f";\n      the tie rules differ by {tie:.1e} on these inputs; each tool vs the float32 "
                        f"reference of METHODS.md {own:.1e}"
                    )
                elif ("mergeflow", "ref") in per and ("mergekit", "ref") in per:
                    own = max(per[("mergeflow", "ref")]["rel_l2"], per[("mergekit", "ref")]["rel_l2"])
                    line += f";\n      each tool vs the float32 reference {own:.1e}"
            elif ("mergekit", "ref-mk") in per:
                own = max(per[("mergeflow", "ref")]["rel_l2"], per[("mergekit", "ref-mk")]["rel_l2"])
                tie = per[("ref-mk", "ref")]["rel_l2"]
                line += (
                    f";\n      each vs the float32 reference of its own tie rule {own:.1e} ({_ok(own <= 1e-3)}); "
                    f"the tie rules alone differ by {tie:.1e}"
                )
            verdict.append(line)
        else:
            failed = [t for t in ("mergeflow", "mergekit") if results.get((method, t)) is not None and results[(method, t)].rc]
            why = f"{' and '.join(failed)} failed" if failed else "needs both mergeflow and mergekit in --tools"
            verdict.append(f"{method}: no ratios ({why})")

    if diffs:
        print("\n## merged tensors: a vs b")
        print("   rel_l2    = max over tensors of ||a-b||_2 / ||b||_2   (the 1e-3 criterion; 'worst' names that tensor)")
        print("   2-D       = the same over matrices only (1-D norm weights sit near 1.0, where bf16 task vectors are coarsest)")
        print("   model     = sqrt(sum ||a-b||^2 / sum ||b||^2) over the whole model")
        print("   rel_max   = max over tensors of max|a-b| / max|b|")
        print("   rel_delta = max over tensors of ||a-b||_2 / ||b - base||_2   (relative to the merge's change: strict)")
        print(f"   differ    = share of all elements whose stored {spec.dtype} values differ")
        print("   ref         float32 reference of METHODS.md (TIES: every entry >= the k-th largest kept; sign 0 on a zero sum)")
        print("   ref-mk      TIES as mergekit computes it: exactly k kept (argsort), sign + on a zero sum")
        print("   ref-exact-k / ref-plus0: only one of those two changes, to attribute the difference")
        hdr = (
            f"{'method':<16} {'a':<16} {'b':<16} {'rel_l2':>9} {'2-D':>9} {'model':>9} {'rel_max':>9} {'rel_delta':>9} "
            f"{'differ':>8}  worst"
        )
        print(hdr)
        print("-" * len(hdr))
        for method, per in diffs.items():
            for (a, b), st in per.items():
                print(
                    f"{method:<16} {a:<16} {b:<16} {st['rel_l2']:>9.2e} {st['rel_l2_2d']:>9.2e} {st['model_l2']:>9.2e} "
                    f"{st['rel_max']:>9.2e} {st['rel_delta']:>9.2e} {_pct(st['frac_diff']):>8}  {st['worst']}"
                )

    print(f"\n## summary ({spec.dtype} inputs; ratios vs mergekit with the same float32 arithmetic, 'mergekit' row)")
    for v in verdict:
        print("  " + v)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "dtype": spec.dtype,
                    "size": args.size,
                    "params": spec.n_params(),
                    "model_bytes": spec.n_bytes(),
                    "input_bytes": nbytes,
                    "read_s": t_read,
                    "mergekit": mk_version,
                    "runs": {
                        f"{m}/{t}": {
                            "rc": r.rc,
                            "wall_s": r.wall_s,
                            "peak_rss": r.peak,
                            "ru_maxrss": r.peak_rss,
                            "tree_rss": r.tree_rss,
                            "anon_rss": r.anon_rss,
                        }
                        for (m, t), r in results.items()
                    },
                    "diffs": {m: {f"{a}|{b}": st for (a, b), st in per.items()} for m, per in diffs.items()},
                },
                indent=2,
            )
        )
    return 0 if all(r.rc == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
