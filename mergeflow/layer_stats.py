"""Layer-input statistics of a model on a few exemplars, for data-driven merges (CAT Merging).

Forward pre-hooks on the model's linear and normalisation layers collect, per parameter name
(the model's own ``named_parameters`` names):

* ``linear`` (an ``nn.Linear`` weight, ``out x in``): the input Gram matrix ``X^T X / N``;
* ``scale`` (a LayerNorm / RMSNorm weight): the mean of ``x_hat^2`` per dimension;
* ``shift`` (a bias of either): the constant 1, per dimension.

Accumulated in float64 on the CPU; linear layers fed the same input tensor share one matrix.
``save_stats`` writes them to a safetensors file (float32) and ``StatsFile`` reads them back
one tensor at a time, so a merge holds only the current tensor's statistics of every task.
Details (what each statistic is, memory use): docs/internals.md#layer-input-statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from mergeflow.errors import MergeflowError


@dataclasses.dataclass
class InputStats:
    kind: str  # "linear" | "scale" | "shift"
    value: torch.Tensor  # linear: (in, in) Gram / rows; scale: (d,) mean x_hat^2; shift: (d,) ones
    rows: int


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)


def layer_input_stats(
    model: torch.nn.Module, forward: Callable[[], Any], names: Iterable[str] | None = None
) -> dict[str, InputStats]:
    """Run ``forward()`` (which calls ``model`` on the exemplars) with hooks; the statistics of
    every linear and normalisation parameter (only those in ``names`` when given)."""
    wanted = set(names) if names is not None else None
    acc: dict[str, list] = {}  # module name -> [kind, sum, rows]
    alias: dict[str, str] = {}  # linear module -> the module whose identical input it shares
    last: list = [None, None]  # the input and module of the latest linear call
    hooks = []

    def want(prefix: str, attr: str) -> bool:
        p = getattr(modules[prefix], attr, None)
        full = f"{prefix}.{attr}" if prefix else attr
        return isinstance(p, torch.Tensor) and (wanted is None or full in wanted)

    def linear_hook(prefix):
        def hook(module, args):
            shared = args[0] is last[0]
            if prefix in alias:
                if not shared:
                    raise MergeflowError(f"layer_input_stats: {prefix} shared the input of {alias[prefix]} once, not now")
                return
            if shared and prefix not in acc:  # q/k/v (gate/up) called one after the other on one tensor
                alias[prefix] = last[1]
                return
            last[0], last[1] = args[0], prefix
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float64)
            entry = acc.setdefault(prefix, ["linear", torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
            entry[1].addmm_(x.T, x)
            entry[2] += x.shape[0]

        return hook

    def norm_hook(prefix, rms: bool):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float64)
            eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
            if rms:
                xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            else:
                xh = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
            entry = acc.setdefault(prefix, ["scale", torch.zeros(x.shape[1], dtype=torch.float64), 0])
            entry[1].add_(xh.pow(2).sum(0))
            entry[2] += x.shape[0]

        return hook

    modules = dict(model.named_modules())
    for prefix, module in modules.items():
        if isinstance(module, torch.nn.Linear) and (want(prefix, "weight") or want(prefix, "bias")):
            hooks.append(module.register_forward_pre_hook(linear_hook(prefix)))
        elif (isinstance(module, torch.nn.LayerNorm) or _is_rms_norm(module)) and (
            want(prefix, "weight") or want(prefix, "bias")
        ):
            hooks.append(module.register_forward_pre_hook(norm_hook(prefix, not isinstance(module, torch.nn.LayerNorm))))
    try:
        forward()
    finally:
        last[0] = None
        for h in hooks:
            h.remove()
    finals = {prefix: (kind, total / rows, rows) for prefix, (kind, total, rows) in acc.items() if rows}
    finals |= {prefix: finals[owner] for prefix, owner in alias.items() if owner in finals}  # one matrix, shared
    out: dict[str, InputStats] = {}
    for prefix, (kind, value, rows) in finals.items():
        name = lambda attr: f"{prefix}.{attr}" if prefix else attr
        if want(prefix, "weight"):
            out[name("weight")] = InputStats(kind, value, rows)
        if want(prefix, "bias"):
            out[name("bias")] = InputStats("shift", torch.ones(modules[prefix].bias.shape[0], dtype=torch.float64), rows)
    if not out:
        raise MergeflowError("layer_input_stats: the forward pass reached no linear or normalisation layer")
    return out


def save_stats(path, stats: dict[str, InputStats]) -> None:
    """Write statistics to a safetensors file (float32, atomically); shared matrices once each."""
    import json

    from safetensors.torch import save_file

    from mergeflow.io.atomic import atomic_file

    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, list[Any]] = {}  # name -> [kind, tensor key, rows]
    seen: dict[int, str] = {}  # id(value) -> tensor key
    for name, st in stats.items():
        key = seen.setdefault(id(st.value), f"t{len(seen)}")
        if key not in tensors:
            tensors[key] = st.value.to(torch.float32).contiguous()
        index[name] = [st.kind, key, st.rows]
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "mergeflow.layer_inputs", "index": json.dumps(index)})


class StatsFile:
    """Read side of ``save_stats``: ``get(name)`` -> InputStats or None, read when asked."""

    def __init__(self, path):
        import json

        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != "mergeflow.layer_inputs":
                raise ValueError(f"format {meta.get('format')!r}")
            self.index = json.loads(meta["index"])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise MergeflowError(f"{path}: not a layer-input statistics file ({exc})") from None

    def get(self, name: str) -> InputStats | None:
        from safetensors import safe_open

        if name not in self.index:
            return None
        kind, key, rows = self.index[name]
        with safe_open(str(self.path), framework="pt") as f:
            return InputStats(kind, f.get_tensor(key), int(rows))

    def __contains__(self, name: str) -> bool:
        return name in self.index
