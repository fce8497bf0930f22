"""Property tests of the parsers of untrusted files: the safetensors header reader, the switch
container and the TVQ container. Random byte mutations of a valid file (flips, overwrites,
truncation, extension) either parse into something whose every byte range lies inside the file,
or fail with the one-line MergeflowError naming the file: never another exception."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergeflow.codecs import quant
from mergeflow.codecs.switch import load_switch, save_switch, switch_stats
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, read_safetensors_header
from mergeflow.methods import tswitch

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_DIR = Path(tempfile.mkdtemp(prefix="mergeflow-fuzz-"))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(6, 5, generator=g),
        "a.bias": torch.randn(6, generator=g),
        "ids": torch.arange(4),
        "half": torch.randn(3, generator=g).half(),
    }


def _model_bytes() -> bytes:
    f = _DIR / "model.safetensors"
    save_file(_tensors(), str(f), metadata={"format": "pt"})
    return f.read_bytes()


def _switch_bytes() -> bytes:
    base = _tensors()
    tau = {k: v.float() * 0.1 for k, v in base.items() if v.is_floating_point()}
    f = _DIR / "s.switch.safetensors"
    save_switch(f, tswitch.compress(iter(tau.items()), 0.6, metadata={"x": "y"}))
    return f.read_bytes()


def _tvq_bytes() -> bytes:
    f = _DIR / "t.tvq"
    quant.save_tvq(f, {k: quant.quantise(v.float(), 4) for k, v in _tensors().items() if v.is_floating_point()})
    return f.read_bytes()


MODEL, SWITCH, TVQ = _model_bytes(), _switch_bytes(), _tvq_bytes()

# A mutation: byte overwrites at positions (biased towards the header), then an optional cut or tail.
mutation = st.tuples(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.floats(0, 1)),
    st.one_of(st.none(), st.binary(min_size=1, max_size=16)),
    st.booleans(),
)


def mutate(data: bytes, m) -> bytes:
    edits, cut, tail, header_only = m
    out = bytearray(data)
    n = int.from_bytes(data[:8], "little")
    span = min(len(out), 8 + n) if header_only else len(out)
    for where, value in edits:
        out[min(int(where * span), len(out) - 1)] = value
    if cut is not None:
        out = out[: int(cut * len(out))]
    if tail is not None:
        out += tail
    return bytes(out)


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=_DIR, suffix=".safetensors")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _one_line(exc: MergeflowError, path: Path) -> None:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text


@SETTINGS
@given(mutation)
def test_header_reader_never_reads_outside_the_file(m):
    data = mutate(MODEL, m)
    path = _write(data)
    try:
        try:
            infos = read_safetensors_header(path)
        except MergeflowError as exc:
            _one_line(exc, path)
            return
        start = 8 + int.from_bytes(data[:8], "little")
        spans = sorted((i.start, i.end) for i in infos.values())
        for (s, e), nxt in zip(spans, spans[1:] + [(len(data), None)]):
            assert start <= s <= e <= nxt[0] <= len(data)
        with Checkpoint(path) as ck:  # every tensor reads exactly its range
            for name, info in infos.items():
                t = ck.get(name)
                assert t.numel() * t.element_size() == info.end - info.start
    finally:
        path.unlink()


@SETTINGS
@given(mutation)
def test_switch_reader_fails_only_in_one_line(m):
    path = _write(mutate(SWITCH, m))
    try:
        for read in (load_switch, switch_stats):
            try:
                read(path)
            except MergeflowError as exc:
                _one_line(exc, path)
    finally:
        path.unlink()


@SETTINGS
@given(mutation)
def test_tvq_reader_fails_only_in_one_line(m):
    path = _write(mutate(TVQ, m))
    try:
        for read in (quant.load_tvq, quant.quant_stats):
            try:
                read(path)
            except MergeflowError as exc:
                _one_line(exc, path)
        try:
            r = quant.QuantReader(path)
            for name in r.names:
                r.tensor(name)
        except MergeflowError as exc:
            _one_line(exc, path)
    finally:
        path.unlink()


@pytest.mark.parametrize("data", [MODEL, SWITCH, TVQ], ids=["model", "switch", "tvq"])
def test_unmutated_files_parse(data):
    path = _write(data)
    try:
        assert read_safetensors_header(path)
    finally:
        path.unlink()
