"""Switch runtime benchmark: apply + remove one task switch in place vs one copy of the weights.

Builds a model-sized state dict (a BERT/ViT-base-like stack by default, about 110M float32
parameters over realistic shapes), T-Switch switches at drop 0.6 for 1 to 8 tasks, and times
(best of --repeat, after a warm-up):

- copy:   one ``copy_`` of every weight tensor into preallocated tensors (the memory-copy floor)
- apply:  ``SwitchRuntime.apply({task: 1.0})``, remove: ``SwitchRuntime.remove()``
- apply+remove of one task switch, and of a mixed combination of all switches (1/T each)
- switch: from one task's switch straight to another's (``SwitchRuntime.switch``), the step a
  server takes between requests of different tasks: one pass over the weights

and prints each time's ratio to the copy (issue 4's target for switching: <= 2), the backup
bytes and the packed switch bytes. Bitwise restoration is checked at the end against a snapshot (--no-verify
skips it). Examples::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/switch_bench.py --layers 12 --switches 8
    .venv/bin/python bench/switch_bench.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeflow.codecs.switch import Switch, SwitchTensor
from mergeflow.methods.tswitch import compress
from mergeflow.runtime import CPU_CHUNK, CUDA_CHUNK, SwitchRuntime

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_shapes(layers: int, hidden: int, vocab: int, positions: int = 512) -> dict[str, tuple[int, ...]]:
    """A transformer encoder's tensors (BERT-base with the defaults: about 110M parameters)."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word.weight": (vocab, hidden),
        "embeddings.position.weight": (positions, hidden),
        "embeddings.norm.weight": (hidden,),
        "embeddings.norm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"attn.{proj}.weight"] = (hidden, hidden)
            shapes[p + f"attn.{proj}.bias"] = (hidden,)
        shapes[p + "mlp.fc1.weight"] = (4 * hidden, hidden)
        shapes[p + "mlp.fc1.bias"] = (4 * hidden,)
        shapes[p + "mlp.fc2.weight"] = (hidden, 4 * hidden)
        shapes[p + "mlp.fc2.bias"] = (hidden,)
        for norm in ("norm1", "norm2"):
            shapes[p + f"{norm}.weight"] = (hidden,)
            shapes[p + f"{norm}.bias"] = (hidden,)
    shapes["pooler.weight"] = (hidden, hidden)
    shapes["logit_scale"] = ()
    return shapes


def make_switch(shapes: dict[str, tuple[int, ...]], seed: int, drop: float, fast: bool) -> Switch:
    """One task's switch from a random task vector (std 1e-3 against weights of std 0.02).

    ``fast``: draw B directly at the keep rate (1 - drop) instead of running T-Switch's
    selection, for quick runs on big models; the runtime's cost does not depend on which."""
    g = torch.Generator().manual_seed(seed)
    taus = ((name, torch.randn(shape, generator=g) * 1e-3) for name, shape in shapes.items())
    if not fast:
        return compress(taus, drop)
    tensors, dense = {}, {}
    for name, tau in taus:
        if tau.dim() == 0:
            dense[name] = tau
            continue
        keep = torch.rand(tau.shape, generator=g) < (1 - drop)
        ternary = (torch.sign(tau) * keep).to(torch.int8)
        tensors[name] = SwitchTensor(ternary, float(torch.tensor(float(tau[keep].norm() / keep.sum().clamp(min=1) ** 0.5))))
    return Switch(tensors=tensors, dense=dense, metadata={"method": "tswitch", "drop": repr(drop)})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best(fn, repeat: int, device: torch.device) -> float:
    """Best wall time of ``fn`` in milliseconds over ``repeat`` runs (after one warm-up)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12: about 110M parameters)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--switches", type=int, default=1, help="tasks (1 to 8)")
    ap.add_argument("--drop", type=float, default=0.6)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None, help="parameters per step (default: runtime's per device)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--workers", type=int, default=None, help="runtime's CPU worker threads (default: torch's thread count)")
    ap.add_argument("--fast-switches", action="store_true", help="draw switches directly instead of T-Switch's selection")
    ap.add_argument("--no-verify", action="store_true", help="skip the bitwise check (it holds a snapshot copy)")
    args = ap.parse_args(argv)
    if not 1 <= args.switches <= 8:
        ap.error("--switches must be 1 to 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    shapes = model_shapes(args.layers, args.hidden, args.vocab)
    g = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype) for name, shape in shapes.items()}
    n_params = sum(t.numel() for t in state.values())
    n_bytes = sum(t.numel() * t.element_size() for t in state.values())

    t0 = time.perf_counter()
    n_built = max(2, args.switches)  # a second task for the switch from one task to another
    switches = {f"task{i}": make_switch(shapes, 100 + i, args.drop, args.fast_switches) for i in range(n_built)}
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    runtime = SwitchRuntime(state, switches, chunk=args.chunk, workers=args.workers)
    t_pack = time.perf_counter() - t0
    del switches
    snapshot = None if args.no_verify else {k: v.clone() for k, v in state.items()}

    copies = {k: torch.empty_like(v) for k, v in state.items()}

    def copy_all():
        for name, t in state.items():
            copies[name].copy_(t)

    one = {"task0": 1.0}
    mixed = {name: 1.0 / args.switches for name in runtime.names[: args.switches]}
    t_copy = best(copy_all, args.repeat, device)
    copies.clear()  # free the copies before timing the runtime
    t_apply = t_remove = float("inf")
    backup = 0
    runtime.apply(one)  # warm-up
    runtime.remove()
    for _ in range(args.repeat):
        sync(device)
        t0 = time.perf_counter()
        runtime.apply(one)
        sync(device)
        t1 = time.perf_counter()
        backup = runtime.backup_nbytes
        runtime.remove()
        sync(device)
        t2 = time.perf_counter()
        t_apply, t_remove = min(t_apply, 1e3 * (t1 - t0)), min(t_remove, 1e3 * (t2 - t1))

    def both(weights):
        def run():
            runtime.apply(weights)
            runtime.remove()

        return run

    t_both = best(both(one), args.repeat, device)
    # serving: from one task's switch straight to another's (SwitchRuntime.switch, one pass)
    t_switch = float("inf")
    runtime.apply(one)
    for i in range(2 * args.repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        runtime.switch({f"task{(i + 1) % 2}": 1.0})
        sync(device)
        t_switch = min(t_switch, 1e3 * (time.perf_counter() - t0))
    runtime.remove()
    mixed_backup = 0
    if args.switches > 1:
        t_mixed = best(both(mixed), args.repeat, device)
        runtime.apply(mixed)
        mixed_backup = runtime.backup_nbytes
        runtime.remove()
    ok = "skipped"
    if snapshot is not None:
        same = all(torch.equal(state[k].reshape(-1).view(torch.uint8), snapshot[k].reshape(-1).view(torch.uint8)) for k in state)
        ok = "yes" if same else "NO"

    packed = runtime.packed_nbytes / n_built
    chunk = args.chunk or (CPU_CHUNK if device.type == "cpu" else CUDA_CHUNK)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"torch threads {torch.get_num_threads()}, runtime workers {runtime._workers}"
    )
    print(
        f"device {device} ({where}), dtype {args.dtype}, {len(state)} tensors, {n_params / 1e6:.1f}M parameters = "
        f"{n_bytes / 2**20:.0f} MiB, {args.switches} switch(es) at drop {args.drop} "
        f"({'drawn' if args.fast_switches else 'T-Switch'}, built {t_build:.1f} s, packed {t_pack:.1f} s), chunk {chunk}"
    )
    rows = [
        ("copy of all weights (copy_)", t_copy, 1.0, ""),
        ("apply one switch (w=1)", t_apply, t_apply / t_copy, ""),
        ("remove it", t_remove, t_remove / t_copy, ""),
        ("apply + remove, one switch", t_both, t_both / t_copy, "target <= 2.0"),
        ("switch task0 <-> task1 (one pass)", t_switch, t_switch / t_copy, "target <= 2.0"),
    ]
    if args.switches > 1:
        rows.append((f"apply + remove, {args.switches} mixed (1/T)", t_mixed, t_mixed / t_copy, ""))
    print(f"{'operation':<34} {'ms':>10} {'x copy':>8}")
    for label, ms, ratio, note in rows:
        print(f"{label:<34} {ms:>10.2f} {ratio:>8.2f}  {note}")
    print(f"{'packed bits per switch':<34} {packed / 2**20:>9.2f}M  ({8 * packed / n_params:.2f} bits/param)")
    print(f"{'backup, one switch applied':<34} {backup / 2**20:>9.2f}M  ({100 * backup / n_bytes:.1f}% of the weights' bytes)")
    if args.switches > 1:
        print(
            f"{'backup, mixed combination':<34} {mixed_backup / 2**20:>9.2f}M  ({100 * mixed_backup / n_bytes:.1f}% of the weights' bytes)"
        )
    print(
        f"restored bitwise after {3 * args.repeat + 3 + (args.repeat + 2 if args.switches > 1 else 0)} apply/switch/remove rounds: {ok}"
    )


if __name__ == "__main__":
    main()
