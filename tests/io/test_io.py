"""Checkpoint reading: safetensors (single, sharded, every dtype), .bin/.pt through a weights-only
load, hf:// refs through an offline Hugging Face cache, and one-line errors naming file and tensor."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, check_compatible, check_finite
from mergeflow.io.sources import resolve_ref

FLOAT8 = [dt for dt in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if dt is not None]


class Custom:
    """A class that a weights-only load must refuse to unpickle."""

    def __init__(self):
        self.payload = [1, 2, 3]


def write_dir(path, tensors, *, config=True):
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "test"}))
    return path


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of dtype, shape and bytes (works for float8 and bool too)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --- safetensors ------------------------------------------------------------------------------


def test_every_dtype_shape_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 3, dtype=torch.float16, generator=g),
        "bf16": torch.randn(7, dtype=torch.bfloat16, generator=g),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 2), dtype=torch.int32, generator=g),
        "i16": torch.randint(-(2**14), 2**14, (3,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "empty_i64": torch.zeros(0, dtype=torch.int64),
    }
    for dt in FLOAT8:
        sd[f"f8_{str(dt)[6:]}"] = torch.randn(8, generator=g).to(dt)
    ck = Checkpoint(write_dir(tmp_path / "m", sd))
    assert sorted(ck.names()) == sorted(sd)
    for name, want in sd.items():
        assert ck.tensor_dtype(name) == want.dtype and ck.shape(name) == tuple(want.shape)
        got = ck.get(name)
        assert same(got, want), name
        assert got.is_contiguous() and got.device.type == "cpu"
    assert {name: t.shape for name, t in ck.items()} == {name: t.shape for name, t in sd.items()}
    assert ck.get("scalar").dim() == 0 and ck.get("scalar").item() == 3.25


def test_get_reads_one_tensor_at_call_time_into_fresh_memory(tmp_path):
    a, b = torch.arange(4, dtype=torch.float32), torch.ones(3)
    d = write_dir(tmp_path / "m", {"a": a, "b": b})
    ck = Checkpoint(d)
    first = ck.get("a")
    first.add_(100)  # the caller owns it: the next read is unaffected
    assert torch.equal(ck.get("a"), a)
    # overwrite b's bytes in place (same file size): a still reads right, b reads the new bytes
    data = bytearray((d / "model.safetensors").read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    offsets = json.loads(data[8 : 8 + n])["b"]["data_offsets"]
    data[8 + n + offsets[0] : 8 + n + offsets[1]] = torch.tensor([1.0, float("nan"), 2.0]).numpy().tobytes()
    (d / "model.safetensors").write_bytes(bytes(data))
    assert torch.equal(ck.get("a"), a)
    with pytest.raises(MergeflowError) as exc:
        check_finite("b", ck.get("b"), ck.file_of("b"))
    assert one_line_error(exc) == f"{d / 'model.safetensors'}: tensor b contains NaN"


def test_sharded_via_index(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {"x.w": torch.randn(2, 3), "x.b": torch.randn(3)},
        "model-00002-of-00002.safetensors": {"y.w": torch.randn(4).bfloat16()},
    }
    for shard, tensors in shards.items():
        save_file(tensors, str(d / shard))
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = Checkpoint(d)
    assert sorted(ck.names()) == sorted(weight_map)
    for shard, tensors in shards.items():
        for name, want in tensors.items():
            assert ck.file_of(name) == d / shard and same(ck.get(name), want)


def test_index_errors_name_index_shard_and_tensor(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(d)
    assert one_line_error(exc) == f"{index}: tensor b is in shard s2.safetensors, which is missing"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(MergeflowError, match=r"tensor b listed for s1.safetensors but not in that file"):
        Checkpoint(d)
    save_file({"a": torch.ones(2), "extra": torch.ones(1)}, str(d / "s1.safetensors"))
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(d)
    assert one_line_error(exc).startswith(f"{d / 's1.safetensors'}: tensor extra is not listed")
    index.write_text("{not json")
    with pytest.raises(MergeflowError, match="not a valid checkpoint index"):
        Checkpoint(d)


def test_truncated_file_fails_at_open_naming_file_and_tensor(tmp_path):
    d = write_dir(tmp_path / "m", {"a": torch.randn(10), "b": torch.randn(10)})  # same dtype: b is stored after a
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-8])
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(d)
    msg = one_line_error(exc)
    assert msg.startswith(f"{f}: tensor b is cut short") and "truncated" in msg
    f.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(MergeflowError, match=f"^{f}: not a safetensors file"):
        Checkpoint(d)
    f.write_bytes(data + b"\0" * 3)
    with pytest.raises(MergeflowError, match=f"^{f}: 3 stray bytes after the last tensor"):
        Checkpoint(d)


def test_file_truncated_after_open_fails_on_read(tmp_path):
    d = write_dir(tmp_path / "m", {"a": torch.randn(1000)})
    ck = Checkpoint(d)
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(MergeflowError) as exc:
        ck.get("a")
    assert one_line_error(exc).startswith(f"{f}: cannot read tensor a")


def raw_safetensors(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "header, data, expected",
    [
        (b"{not json", b"", "invalid safetensors header JSON"),
        (b"[1, 2]", b"", "invalid safetensors header (not a JSON object)"),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
            "tensor w has data_offsets [0, 4] for shape [2] F32 (8 bytes)",
        ),
        (
            json.dumps(
                {
                    "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                }
            ).encode(),
            b"\0" * 4,
            "data overlaps another tensor or leaves a gap",
        ),
        (json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"\0", "tensor w has dtype Q7"),
        (
            json.dumps({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
            "tensor w has an invalid header entry",
        ),
    ],
)
def test_corrupt_headers(tmp_path, header, data, expected):
    f = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(f)
    msg = one_line_error(exc)
    assert msg.startswith(f"{f}: ") and expected in msg


def test_garbage_file(tmp_path):
    f = tmp_path / "garbage.safetensors"
    f.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(f)
    assert one_line_error(exc).startswith(f"{f}: not a safetensors file")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(MergeflowError, match="too short for a header"):
        Checkpoint(tmp_path / "tiny.safetensors")


def test_unknown_tensor_name(tmp_path):
    ck = Checkpoint(write_dir(tmp_path / "m", {"a": torch.ones(1)}))
    with pytest.raises(MergeflowError) as exc:
        ck.get("nope")
    assert one_line_error(exc) == f"{tmp_path / 'm'}: tensor nope not in checkpoint"


# --- compatibility and finiteness ---------------------------------------------------------------


def test_check_compatible_names_shapes_dtypes(tmp_path):
    base = Checkpoint(write_dir(tmp_path / "base", {"w": torch.zeros(2, 2).bfloat16(), "ids": torch.arange(3)}))
    fp16 = write_dir(tmp_path / "fp16", {"w": torch.zeros(2, 2).half(), "ids": torch.arange(3)})
    with pytest.raises(MergeflowError) as exc:
        check_compatible(base, Checkpoint(fp16))
    assert one_line_error(exc) == f"{fp16}: tensor w has dtype float16, base {base.path} has bfloat16"
    f32 = write_dir(tmp_path / "f32", {"w": torch.zeros(2, 2), "ids": torch.arange(3)})
    with pytest.raises(MergeflowError, match="tensor w has dtype float32, base .* has bfloat16"):
        check_compatible(base, Checkpoint(f32))
    # non-floating buffers (copied from the base) may differ in integer width
    check_compatible(
        base, Checkpoint(write_dir(tmp_path / "ok", {"w": torch.ones(2, 2).bfloat16(), "ids": torch.arange(3).int()}))
    )
    missing = write_dir(tmp_path / "missing", {"w": torch.zeros(2, 2).bfloat16()})
    with pytest.raises(MergeflowError) as exc:
        check_compatible(base, Checkpoint(missing))
    assert one_line_error(exc) == f"{missing}: tensor ids of the base is missing"
    extra = write_dir(tmp_path / "extra", {"w": torch.zeros(2, 2).bfloat16(), "ids": torch.arange(3), "z": torch.ones(1)})
    with pytest.raises(MergeflowError) as exc:
        check_compatible(base, Checkpoint(extra))
    assert one_line_error(exc) == f"{extra}: tensor z is not in the base {base.path}"
    shape = write_dir(tmp_path / "shape", {"w": torch.zeros(4).bfloat16(), "ids": torch.arange(3)})
    with pytest.raises(MergeflowError) as exc:
        check_compatible(base, Checkpoint(shape))
    assert one_line_error(exc) == f"{shape}: tensor w has shape [4], base has [2, 2]"


def test_check_finite():
    check_finite("t", torch.tensor([1.0, -2.0]), "src")
    check_finite("i", torch.tensor([1, 2]), "src")  # integers are never NaN
    with pytest.raises(MergeflowError, match=r"^f.safetensors: tensor t contains NaN$"):
        check_finite("t", torch.tensor([1.0, float("nan"), float("inf")]), "f.safetensors")
    with pytest.raises(MergeflowError, match=r"^f.safetensors: tensor t contains Inf$"):
        check_finite("t", torch.tensor([1.0, -float("inf")]).bfloat16(), "f.safetensors")


# --- .bin / .pt ---------------------------------------------------------------------------------


def test_bin_directory_and_files(tmp_path):
    w = torch.randn(3, 4)
    sd = {"w": w, "wt": w.t(), "b": torch.randn(4).half(), "ids": torch.arange(5), "s": torch.tensor(2.0)}
    d = tmp_path / "binmodel"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    ck = Checkpoint(d)
    assert set(ck.names()) == set(sd) and ck.config_path == d / "config.json"
    for name, want in sd.items():
        assert ck.shape(name) == tuple(want.shape) and ck.tensor_dtype(name) == want.dtype
        got = ck.get(name)
        assert same(got, want.contiguous()) and got.is_contiguous()
    ck.get("w").mul_(0)  # a copy: the mapped file is untouched
    assert torch.equal(ck.get("w"), w) and ck.dtype() == torch.float32
    # safetensors wins when both are present
    save_file({k: v.contiguous() * 0 if v.is_floating_point() else v for k, v in sd.items()}, str(d / "model.safetensors"))
    assert torch.equal(Checkpoint(d).get("w"), torch.zeros(3, 4))
    # a single .pt file, and the legacy (non-zip) format that cannot be memory-mapped
    torch.save(sd, tmp_path / "one.pt")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for f in (tmp_path / "one.pt", tmp_path / "legacy.bin"):
        assert same(Checkpoint(f).get("b"), sd["b"])


def test_sharded_bin_via_index(tmp_path):
    d = tmp_path / "binsharded"
    d.mkdir()
    parts = {
        "pytorch_model-00001-of-00002.bin": {"a": torch.randn(3)},
        "pytorch_model-00002-of-00002.bin": {"b": torch.randn(2, 2)},
    }
    for shard, tensors in parts.items():
        torch.save(tensors, d / shard)
    weight_map = {name: shard for shard, tensors in parts.items() for name in tensors}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = Checkpoint(d)
    for _ in range(2):  # alternating shards: each is re-mapped on demand
        for shard, tensors in parts.items():
            for name, want in tensors.items():
                assert ck.file_of(name) == d / shard and torch.equal(ck.get(name), want)


def test_weights_only_refuses_pickled_objects(tmp_path):
    f = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "obj": Custom()}, f)
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(f)
    msg = one_line_error(exc)
    assert msg.startswith(f"{f}: refused by torch.load(weights_only=True)") and "Custom" in msg


@pytest.mark.parametrize(
    "obj, expected",
    [
        ([torch.ones(1)], "not a state dict of tensors (top level is a list)"),
        (torch.ones(1), "not a state dict of tensors (top level is a Tensor)"),
        (
            {"state_dict": {"w": torch.ones(1)}},
            "tensor state_dict is a dict, not a dense tensor (nested state dicts are not supported)",
        ),
        ({"w": torch.ones(1), "step": 3}, "tensor step is a int, not a dense tensor"),
    ],
)
def test_bin_that_is_not_a_flat_state_dict(tmp_path, obj, expected):
    f = tmp_path / "x.pt"
    torch.save(obj, f)
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(f)
    assert one_line_error(exc) == f"{f}: {expected}"


def test_corrupt_bin(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.randn(100)}, good)
    for name, data in (("garbage.bin", b"hello world" * 10), ("cut.bin", good.read_bytes()[:200])):
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(MergeflowError) as exc:
            Checkpoint(f)
        assert one_line_error(exc).startswith(f"{f}: corrupt or truncated torch file")


def test_missing_directory_contents(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeflowError) as exc:
        Checkpoint(tmp_path / "empty")
    assert "no model.safetensors" in one_line_error(exc) and "pytorch_model.bin" in str(exc.value)


# --- lifetime -----------------------------------------------------------------------------------


def test_close_context_and_pickle(tmp_path):
    sd = {"a": torch.randn(5)}
    d = write_dir(tmp_path / "m", sd)
    with Checkpoint(d) as ck:
        assert torch.equal(ck.get("a"), sd["a"])
    assert torch.equal(ck.get("a"), sd["a"])  # reopens after close
    clone = pickle.loads(pickle.dumps(ck))
    assert torch.equal(clone.get("a"), sd["a"]) and clone.names() == ["a"]
    ck.close()
    clone.close()


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_peak_memory_is_one_tensor_not_the_file(tmp_path):
    """Reading every tensor of a 64 MiB file keeps peak RSS near one 4 MiB tensor."""
    f = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, str(f))
    code = textwrap.dedent(f"""
        import resource, torch
        from mergeflow.io.checkpoint import Checkpoint
        ck = Checkpoint({str(f)!r})
        ck.get("t0")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i, name in enumerate(sorted(ck.names(), key=lambda n: int(n[1:]))):
            assert float(ck.get(name)[-1, -1]) == i
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout.strip()) < 24, out.stdout  # MiB; the file is 64


# --- hf:// refs through an offline Hugging Face cache --------------------------------------------


def hf_cache(root, repo, commit, files):
    """The layout huggingface_hub writes: blobs/, refs/main (the commit, no newline), snapshots/<commit>/ links."""
    storage = root / ("models--" + repo.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snap = storage / "snapshots" / commit
    (storage / "blobs").mkdir()
    snap.mkdir(parents=True)
    for i, (name, write) in enumerate(files.items()):
        blob = storage / "blobs" / f"blob{i}"
        write(blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hf_ref_resolves_from_offline_cache(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    sd = {"w": torch.randn(2, 3)}
    snap = hf_cache(
        offline_hub,
        "org/name",
        commit,
        {
            "config.json": lambda p: p.write_text("{}"),
            "model.safetensors": lambda p: save_file(sd, str(p)),
        },
    )
    for ref in ("hf://org/name", f"hf://org/name@{commit}", "hf://org/name@main"):
        path = resolve_ref(ref)
        assert path.resolve() == snap.resolve(), ref
    ck = Checkpoint(resolve_ref("hf://org/name"))
    assert torch.equal(ck.get("w"), sd["w"]) and ck.config_path is not None


def test_hf_ref_bin_only_repo(offline_hub):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    sd = {"w": torch.randn(4)}
    hf_cache(
        offline_hub,
        "org/old",
        commit,
        {
            "config.json": lambda p: p.write_text("{}"),
            "pytorch_model.bin": lambda p: torch.save(sd, p),
        },
    )
    assert torch.equal(Checkpoint(resolve_ref("hf://org/old")).get("w"), sd["w"])


def test_hf_ref_errors(offline_hub):
    for ref in ("hf://org/missing", "hf://org/missing@0123456789abcdef0123456789abcdef01234567"):
        with pytest.raises(MergeflowError) as exc:
            resolve_ref(ref)
        assert one_line_error(exc).startswith(f"{ref}: cannot resolve org/missing@")
    for ref in ("hf://justname", "hf://a/b/c", "hf://org/name@"):
        with pytest.raises(MergeflowError, match="expected hf://org/name"):
            resolve_ref(ref)


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_saved_safetensors_are_byte_identical_across_processes(tmp_path):
    """safetensors orders metadata by hash map; save_tensors makes the header canonical."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from mergeflow.io.checkpoint import save_tensors; "
        "save_tensors(sys.argv[1], {'b': torch.arange(3.0), 'a': torch.ones(2, 2)}, "
        "{k: k * 3 for k in 'qwertyuiop'})"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", script, str(f)], check=True)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    from safetensors import safe_open

    raw = files[0].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted("qwertyuiop")
    with safe_open(str(files[0]), framework="pt") as fh:
        assert fh.metadata() == {k: k * 3 for k in "qwertyuiop"}
        assert torch.equal(fh.get_tensor("b"), torch.arange(3.0))
