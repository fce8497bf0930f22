"""mergeflow.codecs.switch: the binary task switch container (round trips, sizes, bad files)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergeflow.codecs.switch import FORMAT_NAME, FORMAT_VERSION, Switch, SwitchTensor, load_switch, save_switch, switch_stats
from mergeflow.errors import MergeflowError


def random_ternary(shape, q: float, seed: int, neg_share: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(shape, generator=g) < q
    negative = torch.rand(shape, generator=g) < neg_share
    return torch.where(kept, torch.where(negative, -1, 1), 0).to(torch.int8)


def sample_switch() -> Switch:
    return Switch(
        tensors={
            "layer.0.weight": SwitchTensor(random_ternary((16, 8), 0.4, 0), 0.125),
            "layer.0.bias": SwitchTensor(random_ternary((16,), 0.3, 1), 2.5),
        },
        dense={"logit_scale": torch.tensor(4.6), "head.weight": torch.randn(3, 4, dtype=torch.float16)},
        skipped=["frozen.weight"],
        metadata={"task": "mnist", "drop": "0.6"},
    )


def bitmap_bits(n: int, kept: int) -> int:
    """Payload bits of one bitmap tensor: byte-padded keep bits, byte-padded sign bits, scale."""
    return 8 * (math.ceil(n / 8) + math.ceil(kept / 8)) + 32


# --- round trips -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=4),
    q=st.floats(0.0, 1.0),
    neg_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    encoding=st.sampled_from(["bitmap", "ans", "auto"]),
    scale=st.floats(width=32, allow_nan=False, allow_infinity=False),
)
def test_round_trip(shape, q, neg_share, seed, encoding, scale):
    ternary = random_ternary(tuple(shape), q, seed, neg_share)
    switch = Switch(tensors={"w": SwitchTensor(ternary, scale)})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.safetensors"
        stats = save_switch(path, switch, encoding=encoding)
        back = load_switch(path)
        assert switch_stats(path) == stats
        assert os.listdir(d) == ["s.safetensors"]
    got = back.tensors["w"]
    assert got.ternary.dtype == torch.int8 and got.ternary.shape == ternary.shape
    assert torch.equal(got.ternary, ternary)
    assert got.scale == scale
    n, kept = ternary.numel(), int(ternary.ne(0).sum())
    assert (stats.n_params, stats.n_kept) == (n, kept)
    enc, bits = stats.per_tensor["w"]
    assert enc == encoding or encoding == "auto"
    if enc == "bitmap":
        assert bits == bitmap_bits(n, kept)
    if encoding == "auto":
        assert bits <= bitmap_bits(n, kept)
    assert stats.bits_per_param == 8 * stats.payload_bytes / n == bits / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_round_trip_bitwise(tmp_path, dtype):
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-3, -65504.0]).to(dtype)
    dense = {"head": torch.randn(5, 3).to(dtype), "scalar": torch.tensor(1.5, dtype=dtype), "special": special}
    save_switch(tmp_path / "s.safetensors", Switch(dense=dense, skipped=["z"]))
    back = load_switch(tmp_path / "s.safetensors")
    assert back.tensors == {} and back.skipped == ["z"]
    for name, t in dense.items():
        got = back.dense[name]
        assert got.dtype == dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_full_switch_round_trip(tmp_path):
    switch = sample_switch()
    save_switch(tmp_path / "s.safetensors", switch)
    back = load_switch(tmp_path / "s.safetensors")
    assert back.metadata == switch.metadata and back.skipped == switch.skipped
    assert list(back.tensors) == list(switch.tensors) and list(back.dense) == list(switch.dense)
    for name, t in switch.tensors.items():
        assert torch.equal(back.tensors[name].ternary, t.ternary) and back.tensors[name].scale == t.scale
        assert torch.equal(back.delta(name), t.scale * t.ternary.float())
    assert back.delta("layer.0.bias", torch.bfloat16).dtype == torch.bfloat16


def test_empty_switch(tmp_path):
    stats = save_switch(tmp_path / "s.safetensors", Switch(skipped=["a", "b"]))
    assert (stats.n_params, stats.payload_bytes, stats.bits_per_param) == (0, 0, 0.0)
    assert load_switch(tmp_path / "s.safetensors").skipped == ["a", "b"]


# --- sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.4, 0.1])
def test_bits_per_param_against_the_floor(tmp_path, q):
    n = 1 << 20
    ternary = random_ternary((1024, 1024), q, 7)
    kept = int(ternary.ne(0).sum())
    q_kept = kept / n  # the floor: a kept-or-not bit at its entropy, plus one sign bit per kept entry
    floor = -(q_kept * math.log2(q_kept) + (1 - q_kept) * math.log2(1 - q_kept)) + q_kept
    switch = Switch(tensors={"w": SwitchTensor(ternary, 0.01)})

    bitmap = save_switch(tmp_path / "b.safetensors", switch, encoding="bitmap")
    assert bitmap.payload_bytes * 8 == bitmap_bits(n, kept)
    # exactly 1 + q, plus the 32-bit scale and the sign bits' padding to a whole byte, per param
    assert bitmap.bits_per_param == (n + kept + 32 + (-kept % 8)) / n
    assert bitmap.entropy_floor_bits == pytest.approx(floor)

    ans = save_switch(tmp_path / "a.safetensors", switch, encoding="ans")
    assert floor * 0.99 < ans.bits_per_param < floor * 1.01
    assert save_switch(tmp_path / "x.safetensors", switch).per_tensor["w"][0] == "ans"
    assert ans.file_bytes == os.path.getsize(tmp_path / "a.safetensors")


def test_stats_sum_over_tensors(tmp_path):
    stats = save_switch(tmp_path / "s.safetensors", sample_switch(), encoding="bitmap")
    assert sum(bits for _, bits in stats.per_tensor.values()) == 8 * stats.payload_bytes
    tensors = sample_switch().tensors.values()
    assert 8 * stats.payload_bytes == sum(bitmap_bits(t.ternary.numel(), int(t.ternary.ne(0).sum())) for t in tensors)


# --- the documented bytes (docs/switch-format.md, worked example) --------------------------

EXAMPLE = torch.tensor([0, 1, -1, 0, 0, 1, 0, -1], dtype=torch.int8)


@pytest.mark.parametrize("encoding, payload", [("bitmap", "a6 0a"), ("ans", "4d 00 40 90")])
def test_documented_example_bytes(tmp_path, encoding, payload):
    path = tmp_path / "ex.safetensors"
    save_switch(path, Switch(tensors={"w": SwitchTensor(EXAMPLE, 0.5)}), encoding=encoding)
    with safe_open(path, "pt") as f:
        assert bytes(f.get_tensor("payload").numpy()).hex(" ") == payload
        assert f.get_tensor("scales").tolist() == [0.5]
        meta = f.metadata()
    assert (meta["format"], meta["format_version"]) == (FORMAT_NAME, str(FORMAT_VERSION))
    n_bytes = len(payload.split())
    assert read_index(path)["tensors"] == [
        {"name": "w", "shape": [8], "encoding": encoding, "counts": [2, 4, 2], "bytes": n_bytes}
    ]


# --- bad files ---------------------------------------------------------------------------


def assert_refused(path: Path, match: str = "") -> None:
    with pytest.raises(MergeflowError) as info:
        load_switch(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert match in message, message


def read_index(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(zlib.decompress(f.get_tensor("index").numpy().tobytes()))


def rewrite_metadata(path: Path, fix_crc: bool = False, index: dict | bytes | None = None, **changes: str) -> None:
    """Rewrite a switch file's header fields and/or its index (re-checksumming the index if ``fix_crc``)."""
    with safe_open(path, "pt") as f:
        meta, tensors = {**f.metadata(), **changes}, {k: f.get_tensor(k) for k in f.keys()}
    if index is not None:
        raw = index if isinstance(index, bytes) else json.dumps(index).encode()
        tensors["index"] = torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)
    if fix_crc:
        meta["index_crc32"] = str(zlib.crc32(tensors["index"].numpy().tobytes()))
    save_file(tensors, path, metadata=meta)


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    save_switch(path, sample_switch(), encoding="auto")
    return path


def test_truncated(good):
    data = good.read_bytes()
    for cut in (3, 20, len(data) // 2, len(data) - 1):
        good.write_bytes(data[:cut])
        assert_refused(good)


def test_flipped_header_byte(good):
    data = bytearray(good.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    for pos in (8, 8 + header_len // 2, 8 + header_len - 2):
        flipped = bytearray(data)
        flipped[pos] ^= 0x5A
        good.write_bytes(bytes(flipped))
        assert_refused(good)


def test_flipped_payload_byte_fails_checksum(good):
    data = bytearray(good.read_bytes())
    data[-40] ^= 0x01
    good.write_bytes(bytes(data))
    assert_refused(good, "checksum")


def test_newer_version_refused(good):
    rewrite_metadata(good, format_version=str(FORMAT_VERSION + 1))
    assert_refused(good, "newer")
    with pytest.raises(MergeflowError, match="newer"):
        switch_stats(good)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format_version": "x"}, "version"),
        ({"format": "other"}, "not a"),
        ({"index_crc32": "1"}, "checksum"),
    ],
)
def test_bad_header_fields(good, changes, match):
    rewrite_metadata(good, **changes)
    assert_refused(good, match)


def test_garbled_index(good):
    rewrite_metadata(good, fix_crc=True, index=b"{")
    assert_refused(good, "index")


def test_index_lies_about_counts(good):
    index = read_index(good)
    entry = index["tensors"][0]
    assert entry["name"] == "layer.0.weight"
    entry["counts"] = [entry["counts"][0] + 1, entry["counts"][1] - 1, entry["counts"][2]]
    rewrite_metadata(good, fix_crc=True, index=index)
    assert_refused(good, "layer.0.weight")


def test_index_metadata_edit_fails_checksum(good):
    index = read_index(good)
    index["skipped"] = []
    rewrite_metadata(good, index=index)
    assert_refused(good, "checksum")


def test_not_a_switch_and_missing(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert_refused(tmp_path / "plain.safetensors", "not a")
    assert_refused(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    assert_refused(tmp_path / "junk.safetensors")


# --- writing: validation and atomicity ---------------------------------------------------


@pytest.mark.parametrize(
    "switch, match",
    [
        (Switch(tensors={"w": SwitchTensor(torch.tensor([0, 2], dtype=torch.int8), 1.0)}), "w"),
        (Switch(tensors={"w": SwitchTensor(torch.tensor([0, 1]), 1.0)}), "int8"),
        (Switch(tensors={"w": SwitchTensor(torch.tensor([0, 1], dtype=torch.int8), math.nan)}), "scale"),
        (Switch(dense={"w": torch.ones(1)}, skipped=["w"]), "both"),
        (Switch(metadata={"drop": 0.6}), "drop"),  # type: ignore[dict-item]
    ],
)
def test_bad_switch_leaves_existing_file(good, switch, match):
    before = good.read_bytes()
    with pytest.raises(MergeflowError, match=match):
        save_switch(good, switch)
    assert good.read_bytes() == before
    assert os.listdir(good.parent) == [good.name]


def test_failed_write_leaves_existing_file(good, monkeypatch):
    before = good.read_bytes()

    def broken(tensors, path, metadata):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    import mergeflow.codecs._container as container

    monkeypatch.setattr(container, "save_file", broken)
    with pytest.raises(OSError):
        save_switch(good, sample_switch())
    assert good.read_bytes() == before
    assert os.listdir(good.parent) == [good.name]


def test_bad_encoding_name(tmp_path):
    with pytest.raises(MergeflowError, match="encoding"):
        save_switch(tmp_path / "s.safetensors", sample_switch(), encoding="zip")  # type: ignore[arg-type]
