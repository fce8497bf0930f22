"""Random LLaMA-architecture checkpoints for the merge benchmarks, written by streaming.

A base (random weights, bfloat16 or float32, Hugging Face layout with the tensor names of transformers'
``LlamaForCausalLM``) and N "fine-tunes" of it (base + small random deltas) are generated in
one pass, tensor by tensor and a few rows at a time: each block of rows of the base is made,
written to the base file, and each fine-tune's version of it is made and written to that
fine-tune's file before the next block.
Safetensors files are written header first (all shapes are known in advance), then the tensor
bytes in order, so the generator never holds more than a few tensors: it can produce
checkpoints larger than the machine's RAM.

The deltas are ``delta * rms * N(0, 1)`` (rms: the base tensor's nominal RMS), rounded with the
fine-tune to the spec's dtype (as a real fine-tune is stored). In bfloat16 the task vectors live
on the bf16 grid and have many exact ties in magnitude; in float32 ties (and exact zero sums of
task vectors) are all but absent. Generated sets are cached under a directory keyed by the spec
(dtype included), the number of fine-tunes, the delta scale, the seed and the sharding, with a
``COMPLETE`` marker written last, so reruns reuse them and a killed generation is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

CHUNK = 1 << 22  # elements generated at a time
VERSION = 2  # of the generated data (part of the cache key)

DTYPES = {  # name: (torch dtype, safetensors dtype, bytes per element)
    "bfloat16": (torch.bfloat16, "BF16", 2),
    "float32": (torch.float32, "F32", 4),
}


@dataclass(frozen=True)
class LlamaSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    dtype: str = "bfloat16"  # of the stored weights: a key of DTYPES

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][2]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers' LlamaForCausalLM.state_dict() lists them."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    def n_params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    def n_bytes(self) -> int:
        """Tensor bytes of one checkpoint (the files add a small JSON header)."""
        return self.itemsize * self.n_params()

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "initializer_range": 0.02,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
            "use_cache": True,
        }


# Presets (bfloat16). "medium" is ~166M parameters (~330 MB in bf16), the size the issue quotes
# for mergekit. preset(size, "float32") halves the layers and the vocabulary: about half the
# parameters, so about the same bytes per file, with every matrix of a layer the same shape.
PRESETS = {
    "tiny": LlamaSpec(256, 688, 2, 4, 2, vocab_size=4096),  # ~3M: unit-test speed
    "small": LlamaSpec(512, 1376, 4, 8, 4, vocab_size=8000),  # ~20M
    "medium": LlamaSpec(1024, 3072, 8, 16, 8),  # ~166M
    "large": LlamaSpec(2048, 5632, 22, 32, 4),  # ~1.1B (TinyLlama shape), ~2.2 GB
}


def preset(size: str, dtype: str = "bfloat16") -> LlamaSpec:
    """PRESETS[size] stored in ``dtype``. For float32: half the layers and half the vocabulary
    (about half the parameters, so about the bytes of the bf16 preset; e.g. medium: hidden 1024,
    4 layers, vocab 16000, 83M params, 332 MB)."""
    spec = PRESETS[size]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(DTYPES)}")
    if dtype == "bfloat16":
        return spec
    scale = DTYPES["bfloat16"][2] / DTYPES[dtype][2]
    return replace(
        spec,
        num_hidden_layers=max(1, round(spec.num_hidden_layers * scale)),
        vocab_size=max(256, round(spec.vocab_size * scale)),
        dtype=dtype,
    )


def spec_with_bytes(target_bytes: int, base: LlamaSpec = PRESETS["large"], dtype: str = "bfloat16") -> LlamaSpec:
    """The ``base`` shape with as many layers as reach ``target_bytes`` in ``dtype`` (at least 1)."""
    h, i, kv = base.hidden_size, base.intermediate_size, base.num_key_value_heads * base.head_dim
    fixed = 2 * base.vocab_size * h + h
    per_layer = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h
    layers = max(1, -(-(target_bytes // DTYPES[dtype][2] - fixed) // per_layer))
    return LlamaSpec(h, i, layers, base.num_attention_heads, base.num_key_value_heads, base.vocab_size, dtype=dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time."""

    def __init__(
        self,
        path: Path,
        tensors: list[tuple[str, tuple[int, ...]]],
        dtype: str = "BF16",
        itemsize: int = 2,
        metadata: dict | None = None,
    ):
        self.path, self.order, self.itemsize = Path(path), [n for n, _ in tensors], itemsize
        header, offset = {}, 0
        for name, shape in tensors:
            size = _numel(shape) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
        self.size = 8 + len(raw) + offset
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.sizes = [_numel(s) * itemsize for _, s in tensors]
        self.next, self.pending = 0, 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append ``t`` (the whole tensor, or the next rows of it) to tensor ``name``."""
        if self.pending == 0:
            if self.order[self.next] != name:
                raise ValueError(f"{self.path}: expected {self.order[self.next]}, got {name}")
            self.pending = self.sizes[self.next]
            self.next += 1
        elif name != self.order[self.next - 1]:
            raise ValueError(f"{self.path}: {self.order[self.next - 1]} is not complete")
        t = t.contiguous().cpu()
        n = t.numel() * self.itemsize
        if n > self.pending:
            raise ValueError(f"{self.path}: too much data for {name}")
        self.pending -= n
        self.f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")

    def close(self) -> None:
        if self.next != len(self.order) or self.pending:
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensors not written")
        self.f.close()


def _split_shards(tensors, n_shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the ordered tensor list into ``n_shards`` contiguous groups of about equal bytes."""
    total = sum(_numel(s) for _, s in tensors)
    shards, cur, acc = [[]], 0, 0
    for name, shape in tensors:
        if acc >= total * (len(shards)) / n_shards and len(shards) < n_shards and shards[-1]:
            shards.append([])
        shards[-1].append((name, shape))
        acc += _numel(shape)
    return shards


class _ModelWriter:
    """One checkpoint directory: config.json + one file or shards with model.safetensors.index.json."""

    def __init__(self, path: Path, spec: LlamaSpec, n_shards: int):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
        tensors = spec.tensors()
        groups = _split_shards(tensors, n_shards) if n_shards > 1 else [tensors]
        self.writers, self.by_name = [], {}
        for j, group in enumerate(groups):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
            w = StreamingSafetensorsWriter(
                path / fname, group, dtype=DTYPES[spec.dtype][1], itemsize=spec.itemsize, metadata={"format": "pt"}
            )
            self.writers.append(w)
            for name, _ in group:
                self.by_name[name] = (w, fname)
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": spec.n_bytes()},
                "weight_map": {name: fname for name, (_, fname) in self.by_name.items()},
            }
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, t: torch.Tensor) -> None:
        self.by_name[name][0].write(name, t)

    def close(self) -> None:
        for w in self.writers:
            w.close()


@dataclass(frozen=True)
class ModelSet:
    root: Path
    base: Path
    finetunes: list[Path]
    spec: LlamaSpec

    def files(self) -> list[Path]:
        return sorted(p for d in [self.base, *self.finetunes] for p in d.glob("*.safetensors"))

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())


def _key(spec: LlamaSpec, n_ft: int, delta: float, seed: int, base_shards: int) -> str:
    d = asdict(spec)
    if d["dtype"] == "bfloat16":  # bf16 sets keep the key they had before the dtype field existed
        del d["dtype"]
    blob = json.dumps([VERSION, CHUNK, d, n_ft, delta, seed, base_shards], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def generate(
    workdir: Path, spec: LlamaSpec, n_finetunes: int = 4, delta: float = 0.02, seed: int = 0, base_shards: int = 1, log=print
) -> ModelSet:
    """Generate (or reuse) base + ``n_finetunes`` fine-tunes under ``workdir``; returns their paths."""
    tag = "" if spec.dtype == "bfloat16" else f"-{spec.dtype}"
    name = (
        f"llama-{spec.n_params() / 1e6:.0f}M-h{spec.hidden_size}-L{spec.num_hidden_layers}{tag}"
        f"-ft{n_finetunes}-d{delta:g}-s{seed}-sh{base_shards}-{_key(spec, n_finetunes, delta, seed, base_shards)}"
    )
    root = Path(workdir) / name
    ms = ModelSet(root, root / "base", [root / f"ft{t}" for t in range(n_finetunes)], spec)
    if (root / "COMPLETE").exists():
        log(f"reusing {root} ({ms.total_bytes() / 1e9:.2f} GB)")
        return ms
    if root.exists():
        shutil.rmtree(root)
    total = (1 + n_finetunes) * spec.n_bytes()
    free = shutil.disk_usage(Path(workdir).resolve().anchor if not Path(workdir).exists() else workdir).free
    if total > free - (1 << 30):
        raise SystemExit(f"not enough disk for {total / 1e9:.1f} GB of checkpoints in {workdir} ({free / 1e9:.1f} GB free)")
    log(
        f"generating {root}: base + {n_finetunes} fine-tunes, {spec.n_params() / 1e6:.1f}M params each "
        f"({spec.dtype}, {spec.n_bytes() / 1e6:.0f} MB), {total / 1e9:.2f} GB in all"
    )
    t0 = time.perf_counter()
    writers = [_ModelWriter(ms.base, spec, base_shards)] + [_ModelWriter(p, spec, 1) for p in ms.finetunes]
    g = torch.Generator().manual_seed(seed)
    tdtype = DTYPES[spec.dtype][0]
    for tname, shape in spec.tensors():
        # nominal RMS of the base tensor: N(0, 0.02^2) matrices, RMSNorm weights 1 + N(0, 0.05^2)
        rms = (1 + 0.05**2) ** 0.5 if len(shape) == 1 else 0.02
        rows = max(1, CHUNK // _numel(shape[1:]))  # generate a few rows at a time: memory stays small
        for r0 in range(0, shape[0], rows):
            cshape = (min(rows, shape[0] - r0), *shape[1:])
            if len(shape) == 1:
                base = torch.randn(cshape, generator=g).mul_(0.05).add_(1.0).to(tdtype)
            else:
                base = torch.randn(cshape, generator=g).mul_(0.02).to(tdtype)
            writers[0].write(tname, base)
            b32 = base.float()
            for w in writers[1:]:
                w.write(tname, torch.randn(cshape, generator=g).mul_(delta * rms).add_(b32).to(tdtype))
            del base, b32
    for w in writers:
        w.close()
    os.sync()
    (root / "COMPLETE").write_text(
        json.dumps(
            {"spec": asdict(spec), "finetunes": n_finetunes, "delta": delta, "seed": seed, "base_shards": base_shards}, indent=2
        )
        + "\n"
    )
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return ms


def read_all(files: list[Path], chunk: int = 64 << 20) -> tuple[int, float]:
    """Read every file once into one reused buffer; (bytes, seconds). From the page cache when warm."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0
