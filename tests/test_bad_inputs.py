"""The bad-input campaign: every command, every family of bad input, one table.

Each case builds its inputs in a fresh folder, runs the command line (``run_app``, the code the
``mergeflow`` script runs) and checks what a user sees and keeps:
- exit status 2, nothing on stdout, exactly one line on stderr, ``mergeflow: error: ...``,
  naming the offending file, tensor, key or value, and no traceback;
- the folder afterwards is exactly as before: no output, no temporary file, every input (and
  any file in the way of ``--out``) unchanged, byte for byte.
A few cases also run as real processes, where library warnings and tracebacks would show.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from flows.cli import app
from mergeflow.cli import run_app
from tests.hfcache import add_folder, fake_commit, hf_cache

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"layer.weight": (16, 8), "layer.bias": (16,), "scalar": ()}


# --- the world each case starts from ------------------------------------------------------


@dataclass
class World:
    root: Path
    base: Path
    m0: Path
    m1: Path
    switch: Path  # a good switch file of m0
    merged: Path  # a previous `mergeflow merge` output

    def p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def _tensors(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def _ckpt(folder: Path, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder


@pytest.fixture()
def world(tmp_path, monkeypatch, capsys) -> World:
    root = tmp_path / "w"
    b = _tensors(0)
    base, m0, m1 = _ckpt(root / "base", b), _ckpt(root / "m0", _tensors(1, b)), _ckpt(root / "m1", _tensors(2, b))
    w = World(root, base, m0, m1, root / "t.switch.safetensors", root / "merged")
    assert cli("compress", "--base", base, "--model", m0, "--out", w.switch)[0] == 0
    assert cli("merge", "--method", "task_arithmetic", "--base", base, "--out", w.merged, m0, m1)[0] == 0
    capsys.readouterr()
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    return w


def cli(*argv) -> tuple[int, str, str]:
    return run_app(app, [str(a) for a in argv]), "", ""


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: folders, links (their targets) and files (their content hash)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            f = Path(dirpath) / name
            rel = str(f.relative_to(root))
            if f.is_symlink():
                out[rel] = "-> " + os.readlink(f)
            elif f.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# --- bad files ------------------------------------------------------------------------------


def _header_file(path: Path, header: dict | list | bytes, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _model_like(w: World, name: str, change: Callable[[dict], dict] | None = None) -> Path:
    from mergeflow.io.checkpoint import Checkpoint

    sd = Checkpoint(w.m0).state_dict()
    return _ckpt(w.p(name), change(sd) if change else sd)


def _sharded(w: World, weight_map: dict | str, shards: dict[str, dict] = ()) -> Path:
    d = w.p("sharded")
    d.mkdir()
    (d / "config.json").write_text("{}")
    for name, tensors in dict(shards).items():
        save_file(tensors, str(d / name))
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (d / "model.safetensors.index.json").write_text(text)
    return d


def _split_m0(w: World) -> tuple[dict, dict]:
    from mergeflow.io.checkpoint import Checkpoint

    sd = Checkpoint(w.m0).state_dict()
    return {"layer.weight": sd["layer.weight"]}, {"layer.bias": sd["layer.bias"], "scalar": sd["scalar"]}


def _outside_shard(w: World, rel: str) -> Path:
    a, b = _split_m0(w)
    save_file(b, str(w.p("elsewhere.safetensors")))
    return _sharded(w, {"layer.weight": "a.safetensors", "layer.bias": rel, "scalar": rel}, {"a.safetensors": a})


def _linked_shard(w: World) -> Path:
    a, b = _split_m0(w)
    save_file(b, str(w.p("elsewhere.safetensors")))
    d = _sharded(
        w, {"layer.weight": "a.safetensors", "layer.bias": "b.safetensors", "scalar": "b.safetensors"}, {"a.safetensors": a}
    )
    (d / "b.safetensors").symlink_to(w.p("elsewhere.safetensors"))
    return d


def _linked_weights(w: World) -> Path:
    d = w.p("linked")
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").symlink_to(w.m0 / "model.safetensors")
    return d


def _linked_config(w: World) -> Path:
    d = w.p("linkedcfg")
    d.mkdir()
    save_file(_tensors(5), str(d / "model.safetensors"))
    w.p("secret.json").write_text('{"model_type": "secret"}')
    (d / "config.json").symlink_to(w.p("secret.json"))
    return d


def _hub_repo_escaping(w: World) -> str:
    """An hf:// repo whose snapshot's weights link out of the cache, to a file beside it."""
    commit = fake_commit("escape")
    snap = hf_cache(w.p("hub"), "org/escape", commit, {"config.json": lambda p: p.write_text("{}")})
    (snap / "model.safetensors").symlink_to(w.m0 / "model.safetensors")
    return "hf://org/escape"


def _raw_pickle(w: World) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    f = w.p("raw.bin")
    f.write_bytes(pickle.dumps({"layer.weight": Payload()}, protocol=4))
    return f


def _bin_with_string(w: World) -> Path:
    f = w.p("strings.bin")
    torch.save({"layer.weight": torch.zeros(16, 8), "note": "hello"}, f)
    return f


def _corrupt_switch(w: World) -> Path:
    data = bytearray(w.switch.read_bytes())
    data[-3] ^= 0xFF
    f = w.p("bad.switch.safetensors")
    f.write_bytes(bytes(data))
    return f


def _newer_switch(w: World) -> Path:
    data = w.switch.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = data[8 : 8 + n].replace(b'"format_version":"1"', b'"format_version":"9"')
    assert len(head) == n
    f = w.p("new.switch.safetensors")
    f.write_bytes(data[:8] + head + data[8 + n :])
    return f


def _foreign_dir(w: World, name: str = "mine") -> Path:
    d = w.p(name)
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    return d


def _stage_output(w: World) -> Path:
    from mergeflow.io.atomic import atomic_dir

    with atomic_dir(w.p("artifacts", "merged"), kind="stage:merge") as tmp:
        (tmp / "method.json").write_text("{}")
    return w.p("artifacts", "merged")


def _tvq_file(w: World) -> Path:
    from mergeflow.codecs import quant

    quant.save_tvq(w.p("codes.tvq"), {"a": quant.quantise(torch.randn(8), 4)})
    return w.p("codes.tvq")


def _merged_plus_file(w: World) -> Path:
    (w.merged / "README.md").write_text("my model card")
    return w.merged


def _workspace(w: World, params: dict | str) -> Path:
    text = params if isinstance(params, str) else json.dumps(params)
    f = w.p("params.yaml")
    f.write_text(text)
    return f


def _stage_ws(w: World) -> None:
    (w.p("artifacts")).mkdir()
    w.p("artifacts", "sources.json").write_text(json.dumps({"tasks": ["a"], "source": "zoo://digits"}))
    _foreign_dir(w, "artifacts/vectors")
    _workspace(w, "{}")


def _download_around(w: World) -> None:
    _workspace(w, {"download": {"family": "text_classification", "base": str(w.root), "tasks": {"a": {"model": "m0"}}}})


# --- the table ------------------------------------------------------------------------------
# Each case: (id, builder(world) -> argv, words the one stderr line must contain).

MERGE = ["merge", "--method", "task_arithmetic"]


def merge_to(out_of: Callable[[World], object]):
    return lambda w: [*MERGE, "--base", w.base, "--out", out_of(w), w.m0, w.m1]


def merge_models(models_of: Callable[[World], list]):
    return lambda w: [*MERGE, "--base", w.base, "--out", w.p("out"), *models_of(w)]


def merge_set(*sets: str, method: str = "task_arithmetic"):
    return lambda w: [
        "merge",
        "--method",
        method,
        "--base",
        w.base,
        "--out",
        w.p("out"),
        *[a for s in sets for a in ("--set", s)],
        w.m0,
        w.m1,
    ]


def compress_to(out_of, model_of=lambda w: w.m0, *sets):
    return lambda w: [
        "compress",
        "--base",
        w.base,
        "--model",
        model_of(w),
        "--out",
        out_of(w),
        *[a for s in sets for a in ("--set", s)],
    ]


def apply_with(switch_of, out_of=lambda w: w.p("rebuilt")):
    return lambda w: ["switch", "apply", "--base", w.base, "--switch", switch_of(w), "--out", out_of(w)]


def run_with(params_of, *sets):
    return lambda w: ["run", "--params", params_of(w), *[a for s in sets for a in ("--set", s)]]


def _file(w: World, name: str, text: str = "not mine") -> Path:
    f = w.p(name)
    f.write_text(text)
    return f


def _dir_with_file_parent(w: World) -> Path:
    _file(w, "afile")
    return w.p("afile", "sub")


def _symlink_out(w: World) -> Path:
    target = _foreign_dir(w, "target")
    (w.p("link")).symlink_to(target)
    return w.p("link")


def _changed(sd: dict, **edits) -> dict:
    return {**sd, **edits}


CASES = [
    # 1. outputs never destroy what mergeflow did not write
    ("merge-out-foreign-dir", merge_to(lambda w: _foreign_dir(w)), ["mine", "not a mergeflow output"]),
    ("merge-out-regular-file", merge_to(lambda w: _file(w, "out.txt")), ["out.txt", "is a file"]),
    ("merge-out-is-an-input", merge_to(lambda w: w.m0), ["m0", "is the input"]),
    ("merge-out-is-the-base", merge_to(lambda w: w.base), ["base", "is the input"]),
    ("merge-out-holds-an-input", merge_to(lambda w: w.root), ["contains the input"]),
    ("merge-out-inside-an-input", merge_to(lambda w: w.m0 / "sub"), ["m0/sub", "lies inside the input"]),
    ("merge-out-symlink", merge_to(_symlink_out), ["link", "symbolic link"]),
    ("merge-out-mergeflow-output-plus-user-file", merge_to(_merged_plus_file), ["merged", "README.md", "did not write"]),
    ("merge-out-is-a-switch-file", merge_to(lambda w: w.switch), ["t.switch.safetensors", "is a file"]),
    ("merge-out-parent-is-a-file", merge_to(_dir_with_file_parent), ["afile", "is a file"]),
    (
        "merge-switch-store-out-foreign-dir",
        lambda w: ["merge", "--method", "tswitch", "--base", w.base, "--out", _foreign_dir(w), "--set", "store=switches", w.m0],
        ["mine", "not a mergeflow output"],
    ),
    ("merge-out-a-stage-output", merge_to(lambda w: _stage_output(w)), ["artifacts/merged", "stage:merge", "not a checkpoint"]),
    ("compress-out-a-tvq-file", compress_to(lambda w: _tvq_file(w)), ["codes.tvq", "mergeflow.tvq", "not a mergeflow.switch"]),
    (
        "compress-out-regular-file",
        compress_to(lambda w: _file(w, "s.safetensors")),
        ["s.safetensors", "not written by mergeflow"],
    ),
    ("compress-out-a-folder", compress_to(lambda w: _foreign_dir(w)), ["mine", "is a folder"]),
    ("compress-out-mergeflow-folder", compress_to(lambda w: w.merged), ["merged", "is a folder"]),
    (
        "compress-out-is-the-model-file",
        compress_to(lambda w: w.m0 / "model.safetensors", lambda w: w.m0 / "model.safetensors"),
        ["model.safetensors", "is the input"],
    ),
    ("compress-out-inside-the-model", compress_to(lambda w: w.m0 / "x.switch.safetensors"), ["lies inside the input"]),
    (
        "compress-out-a-model-file",
        compress_to(lambda w: w.m1 / "model.safetensors"),
        ["m1/model.safetensors", "not written by mergeflow"],
    ),
    ("apply-out-is-the-base", apply_with(lambda w: w.switch, lambda w: w.base), ["base", "is the input"]),
    ("apply-out-foreign-dir", apply_with(lambda w: w.switch, lambda w: _foreign_dir(w)), ["mine", "not a mergeflow output"]),
    ("apply-out-is-the-switch", apply_with(lambda w: w.switch, lambda w: w.switch), ["t.switch.safetensors", "is the input"]),
    ("stage-out-foreign-dir", lambda w: (_stage_ws(w), ["stage", "extract"])[1], ["artifacts/vectors", "not a mergeflow output"]),
    (
        "stage-download-source-holds-the-workspace",
        lambda w: (_download_around(w), ["stage", "download"])[1],
        ["download.base", "artifacts/checkpoints", "lies inside the input"],
    ),
    (
        "run-source-holds-the-workspace",
        lambda w: (_download_around(w), ["run", "--params", w.p("params.yaml")])[1],
        ["download.base", "lies inside the input"],
    ),
    (
        "run-artifacts-output-foreign",
        lambda w: (_workspace(w, "{}"), _foreign_dir(w, "artifacts/merged"), ["run", "--params", w.p("params.yaml")])[2],
        ["artifacts/merged", "not a mergeflow output"],
    ),
    # 2. reads stay inside their checkpoint
    (
        "shard-outside-folder",
        merge_models(lambda w: [_outside_shard(w, "../elsewhere.safetensors")]),
        ["model.safetensors.index.json", "../elsewhere.safetensors", "outside the checkpoint"],
    ),
    (
        "shard-absolute-path",
        merge_models(lambda w: [_outside_shard(w, str(w.p("elsewhere.safetensors")))]),
        ["elsewhere.safetensors", "outside the checkpoint"],
    ),
    ("shard-symlink-out", merge_models(lambda w: [_linked_shard(w)]), ["b.safetensors", "leads outside"]),
    ("weights-symlink-out", merge_models(lambda w: [_linked_weights(w)]), ["model.safetensors", "leads outside"]),
    ("config-symlink-out", merge_models(lambda w: [_linked_config(w)]), ["config.json", "leads outside"]),
    ("hub-snapshot-links-out", merge_models(lambda w: [_hub_repo_escaping(w)]), ["model.safetensors", "leads outside"]),
    # 3. parse and usage errors, one line each
    ("merge-set-unparsable", merge_set("scaling=[0.3,"), ["scaling", "cannot parse"]),
    ("merge-set-empty-key", merge_set("=0.5"), ["=0.5", "empty key"]),
    ("merge-set-no-equals", merge_set("scaling"), ["scaling", "key.path=value"]),
    ("merge-set-empty-part", merge_set("a..b=1"), ["a..b", "empty part"]),
    ("merge-set-unknown-hp", merge_set("bogus=1"), ["bogus"]),
    ("merge-set-out-of-range", merge_set("scaling=abc"), ["scaling"]),
    ("merge-set-bad-dtype", merge_set("out_dtype=int8"), ["out_dtype", "int8"]),
    ("merge-set-store-wrong-method", merge_set("store=switches"), ["store"]),
    ("merge-no-models", lambda w: [*MERGE, "--base", w.base, "--out", w.p("out")], ["merge: Missing argument 'models'"]),
    ("merge-no-method", lambda w: ["merge", "--base", w.base, "--out", w.p("out"), w.m0], ["--method"]),
    ("merge-unknown-option", lambda w: [*MERGE, "--bogus", "1", "--base", w.base, "--out", w.p("out"), w.m0], ["--bogus"]),
    ("merge-unknown-method", lambda w: ["merge", "--method", "nope", "--base", w.base, "--out", w.p("out"), w.m0], ["nope"]),
    ("merge-bad-device", lambda w: [*MERGE, "--device", "tpu", "--base", w.base, "--out", w.p("out"), w.m0], ["tpu"]),
    ("compress-drop-out-of-range", compress_to(lambda w: w.p("s.switch.safetensors"), lambda w: w.m0, "drop=2"), ["drop"]),
    (
        "compress-drop-one-keeps-everything",
        compress_to(lambda w: w.p("s.switch.safetensors"), lambda w: w.m0, "drop=1"),
        ["drop", "[0.0, 1.0)"],
    ),
    (
        "run-compress-drop-one",
        run_with(lambda w: _file(w, "p.yaml", "{}"), "compress.drop=1.0"),
        ["compress.drop", "less than 1"],
    ),
    (
        "compress-bad-encoding",
        compress_to(lambda w: w.p("s.switch.safetensors"), lambda w: w.m0, "encoding=zip"),
        ["encoding", "zip"],
    ),
    (
        "compress-set-unparsable",
        compress_to(lambda w: w.p("s.switch.safetensors"), lambda w: w.m0, "drop=["),
        ["drop", "cannot parse"],
    ),
    ("compress-missing-model", lambda w: ["compress", "--base", w.base, "--out", w.p("s.switch.safetensors")], ["--model"]),
    ("apply-missing-switch-option", lambda w: ["switch", "apply", "--base", w.base, "--out", w.p("o")], ["--switch"]),
    ("unknown-command", lambda w: ["mergify"], ["mergify"]),
    ("run-empty-params", run_with(lambda w: _file(w, "empty.yaml", "")), ["empty.yaml", "empty"]),
    ("run-comment-only-params", run_with(lambda w: _file(w, "c.yaml", "# nothing\n")), ["c.yaml", "empty"]),
    ("run-list-params", run_with(lambda w: _file(w, "list.yaml", "- a\n- b\n")), ["list.yaml", "mapping"]),
    ("run-missing-params", run_with(lambda w: w.p("nope.yaml")), ["nope.yaml", "not found"]),
    ("run-params-is-a-folder", run_with(lambda w: w.base), ["base", "folder"]),
    ("run-params-bad-yaml", run_with(lambda w: _file(w, "bad.yaml", "merge: [1,\n")), ["bad.yaml", "YAML"]),
    (
        "run-params-not-utf8",
        run_with(lambda w: (w.p("bin.yaml").write_bytes(b"\xff\xfe\x00a"), w.p("bin.yaml"))[1]),
        ["bin.yaml"],
    ),
    ("run-set-empty-key", run_with(lambda w: _file(w, "p.yaml", "{}"), "=0.5"), ["=0.5", "empty key"]),
    ("run-set-empty-part", run_with(lambda w: _file(w, "p.yaml", "{}"), "merge..x=1"), ["merge..x", "empty part"]),
    ("run-set-unknown-key", run_with(lambda w: _file(w, "p.yaml", "{}"), "bogus.key=1"), ["bogus", "unknown key"]),
    ("run-set-bad-value", run_with(lambda w: _file(w, "p.yaml", "{}"), "seed=-1"), ["seed"]),
    ("run-set-unparsable", run_with(lambda w: _file(w, "p.yaml", "{}"), "seed=[1,"), ["seed", "cannot parse"]),
    ("run-set-into-a-value", run_with(lambda w: _file(w, "p.yaml", "seed: 1"), "seed.x=1"), ["seed", "not a section"]),
    ("run-unknown-top-key", run_with(lambda w: _file(w, "p.yaml", "bogus: 1")), ["bogus", "unknown key"]),
    ("stage-unknown", lambda w: ["stage", "nope"], ["nope"]),
    (
        "stage-set-unparsable",
        lambda w: (_workspace(w, "{}"), ["stage", "extract", "--set", "seed=[1,"])[1],
        ["seed", "cannot parse"],
    ),
    # 4. broken checkpoints: headers, sharding, pickles, tensors
    ("model-missing", merge_models(lambda w: [w.p("nothing")]), ["nothing", "not found"]),
    (
        "model-folder-without-weights",
        merge_models(lambda w: [(w.p("empty").mkdir(), w.p("empty"))[1]]),
        ["empty", "no model.safetensors"],
    ),
    (
        "header-too-short",
        merge_models(lambda w: [(w.p("s.safetensors").write_bytes(b"\x01\x02"), w.p("s.safetensors"))[1]]),
        ["s.safetensors", "too short"],
    ),
    (
        "header-length-past-end",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {}, n=1 << 20)]),
        ["s.safetensors", "header length"],
    ),
    ("header-not-json", merge_models(lambda w: [_header_file(w.p("s.safetensors"), b"{nope")]), ["s.safetensors", "JSON"]),
    (
        "header-a-list",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), [1, 2])]),
        ["s.safetensors", "not a JSON object"],
    ),
    (
        "header-unknown-dtype",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry("Q9")}, b"\0" * 8)]),
        ["s.safetensors", "t", "Q9"],
    ),
    (
        "header-offsets-wrong-size",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry(offsets=(0, 4))}, b"\0" * 4)]),
        ["s.safetensors", "tensor t", "data_offsets"],
    ),
    (
        "header-overlap",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry(), "u": _entry(offsets=(4, 12))}, b"\0" * 12)]),
        ["s.safetensors", "overlaps"],
    ),
    (
        "header-truncated-data",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry()}, b"\0" * 4)]),
        ["s.safetensors", "truncated"],
    ),
    (
        "header-stray-bytes",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry()}, b"\0" * 12)]),
        ["s.safetensors", "stray bytes"],
    ),
    (
        "header-negative-shape",
        merge_models(lambda w: [_header_file(w.p("s.safetensors"), {"t": _entry(shape=(-2,))}, b"\0" * 8)]),
        ["s.safetensors", "tensor t"],
    ),
    (
        "index-not-json",
        merge_models(lambda w: [_sharded(w, "{not json")]),
        ["model.safetensors.index.json", "not a valid checkpoint index"],
    ),
    (
        "index-shard-missing",
        merge_models(lambda w: [_sharded(w, {"layer.weight": "gone.safetensors"})]),
        ["gone.safetensors", "missing"],
    ),
    (
        "index-tensor-not-in-shard",
        merge_models(
            lambda w: [
                _sharded(
                    w,
                    {
                        "layer.weight": "a.safetensors",
                        "layer.bias": "a.safetensors",
                        "scalar": "a.safetensors",
                        "ghost": "a.safetensors",
                    },
                    {"a.safetensors": dict(zip(["layer.weight", "layer.bias", "scalar"], _tensors(1).values()))},
                )
            ]
        ),
        ["ghost"],
    ),
    (
        "raw-pickle-bin",
        merge_models(lambda w: [_raw_pickle(w)]),
        ["raw.bin", "refused by torch.load(weights_only=True)", "operand"],
    ),
    ("bin-holds-a-string", merge_models(lambda w: [_bin_with_string(w)]), ["strings.bin", "note"]),
    ("bin-garbage", merge_models(lambda w: [(w.p("g.bin").write_bytes(b"garbage" * 10), w.p("g.bin"))[1]]), ["g.bin", "refused"]),
    (
        "tensor-nan",
        merge_models(lambda w: [_model_like(w, "nan", lambda sd: _changed(sd, scalar=torch.tensor(float("nan"))))]),
        ["nan", "scalar", "NaN"],
    ),
    (
        "tensor-inf",
        merge_models(
            lambda w: [_model_like(w, "inf", lambda sd: _changed(sd, **{"layer.bias": torch.full((16,), float("inf"))}))]
        ),
        ["inf", "layer.bias", "Inf"],
    ),
    (
        "tensor-missing",
        merge_models(lambda w: [_model_like(w, "miss", lambda sd: {k: v for k, v in sd.items() if k != "scalar"})]),
        ["miss", "scalar", "missing"],
    ),
    (
        "tensor-extra",
        merge_models(lambda w: [_model_like(w, "extra", lambda sd: _changed(sd, head=torch.zeros(3)))]),
        ["extra", "head", "not in the base"],
    ),
    (
        "tensor-shape-mismatch",
        merge_models(lambda w: [_model_like(w, "shape", lambda sd: _changed(sd, **{"layer.bias": torch.zeros(15)}))]),
        ["shape", "layer.bias", "[15]"],
    ),
    (
        "tensor-dtype-mismatch",
        merge_models(lambda w: [_model_like(w, "half", lambda sd: _changed(sd, **{"layer.bias": sd["layer.bias"].half()}))]),
        ["half", "layer.bias", "float16"],
    ),
    # 5. switch containers
    ("switch-corrupt-payload", apply_with(_corrupt_switch), ["bad.switch.safetensors", "checksum"]),
    (
        "switch-not-a-switch",
        apply_with(lambda w: w.m0 / "model.safetensors"),
        ["model.safetensors", "not a mergeflow.switch file"],
    ),
    (
        "switch-truncated",
        apply_with(lambda w: (w.p("cut.safetensors").write_bytes(w.switch.read_bytes()[:100]), w.p("cut.safetensors"))[1]),
        ["cut.safetensors"],
    ),
    ("switch-too-new", apply_with(_newer_switch), ["new.switch.safetensors", "newer"]),
    ("switch-missing", apply_with(lambda w: w.p("none.switch.safetensors")), ["none.switch.safetensors"]),
    # 6. hub refs
    ("hub-ref-malformed", merge_models(lambda w: ["hf://onlyname"]), ["hf://onlyname", "expected hf://org/name"]),
    ("hub-ref-bad-revision", merge_models(lambda w: ["hf://org/name@.."]), ["hf://org/name@..", "expected hf://org/name"]),
    ("hub-ref-not-cached", merge_models(lambda w: ["hf://org/absent"]), ["hf://org/absent", "not in the local cache"]),
    (
        "hub-ref-is-a-dataset",
        lambda w: [*MERGE, "--base", "hf://datasets/org/data", "--out", w.p("out"), w.m0],
        ["hf://datasets/org/data", "a dataset"],
    ),
    (
        "hub-ref-revision-not-cached",
        merge_models(lambda w: (add_folder(w.p("hub"), "org/tiny", w.m0), ["hf://org/tiny@v9"])[1]),
        ["hf://org/tiny@v9", "v9"],
    ),
]


@pytest.mark.parametrize("build,words", [pytest.param(b, words, id=i) for i, b, words in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, build, words):
    argv = [str(a) for a in build(world)]
    before = snapshot(world.root)
    capsys.readouterr()
    code = run_app(app, argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (argv, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("mergeflow: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""
    assert snapshot(world.root) == before


def test_the_campaign_has_sixty_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


# --- as real processes: nothing but the one line -------------------------------------------


def _process(argv: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from flows.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.mark.subprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["raw-pickle-bin", "merge-set-unparsable", "merge-no-models", "merge-out-foreign-dir", "run-empty-params"]
)
def test_as_a_process_stderr_is_one_line(world, case):
    build, words = next((b, w) for i, b, w in CASES if i == case)
    argv = [str(a) for a in build(world)]
    before = snapshot(world.root)
    proc = _process(argv, world.root)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert snapshot(world.root) == before


# --- warnings, then the correct result ------------------------------------------------------


def _ta(base: dict, models: list[dict], lam: float) -> dict:
    return {k: base[k] + lam * sum(m[k] - base[k] for m in models) for k in base}


def test_a_model_given_twice_warns_once_and_merges_as_given(world, capsys):
    from mergeflow.io.checkpoint import Checkpoint

    out = world.p("twice")
    code = run_app(
        app, [*MERGE, "--base", str(world.base), "--out", str(out), "--set", "scaling=0.5", str(world.m0), str(world.m0)]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("mergeflow: warning:")]
    assert len(warnings) == 1 and "given twice" in warnings[0] and "m0" in warnings[0], err
    b, m = Checkpoint(world.base).state_dict(), Checkpoint(world.m0).state_dict()
    want = _ta(b, [m, m], 0.5)
    got = Checkpoint(out).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_a_fine_tune_identical_to_the_base_warns_and_adds_nothing(world, capsys):
    import shutil

    from mergeflow.io.checkpoint import Checkpoint

    same = world.p("copy_of_base")
    shutil.copytree(world.base, same)
    out = world.p("with_copy")
    code = run_app(app, [*MERGE, "--base", str(world.base), "--out", str(out), "--set", "scaling=0.5", str(world.m1), str(same)])
    _, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("mergeflow: warning:")]
    assert len(warnings) == 1 and "identical to the base" in warnings[0] and "copy_of_base" in warnings[0], err
    b, m1 = Checkpoint(world.base).state_dict(), Checkpoint(world.m1).state_dict()
    want = _ta(b, [m1, b], 0.5)
    got = Checkpoint(out).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    code = run_app(app, [*MERGE, "--base", str(world.base), "--out", str(world.p("plain")), str(world.m1)])
    assert code == 0 and "warning" not in capsys.readouterr().err


def test_the_base_given_as_a_model_warns(world, capsys):
    code = run_app(app, [*MERGE, "--base", str(world.base), "--out", str(world.p("o")), str(world.m0), str(world.base)])
    err = capsys.readouterr().err
    assert code == 0
    assert any("is the base itself" in line for line in err.splitlines()), err


def test_tensor_names_are_never_paths(world, capsys):
    """Tensors named like paths merge like any other and write nothing outside --out."""
    from mergeflow.io.checkpoint import Checkpoint

    names = ["../../escape", "/abs/path", "a/../../b"]
    b = {n: torch.full((3,), float(i)) for i, n in enumerate(names)}
    m = {n: t + 1 for n, t in b.items()}
    base, model = _ckpt(world.p("pb"), b), _ckpt(world.p("pm"), m)
    before = snapshot(world.root)
    code = run_app(app, [*MERGE, "--base", str(base), "--out", str(world.p("po")), "--set", "scaling=0.5", str(model)])
    assert code == 0, capsys.readouterr().err
    after = snapshot(world.root)
    assert {k for k in after if k not in before} <= {"po", "po/model.safetensors", "po/config.json", "po/.mergeflow-output"}
    got = Checkpoint(world.p("po")).state_dict()
    for n in names:
        torch.testing.assert_close(got[n], b[n] + 0.5)


def test_a_previous_output_of_the_same_kind_is_replaced(world, capsys):
    """Rerunning a command onto its own earlier output replaces it whole (the default), for every writer."""
    from mergeflow.io.checkpoint import Checkpoint

    b, m0, m1 = (Checkpoint(p).state_dict() for p in (world.base, world.m0, world.m1))
    assert (
        run_app(app, [*MERGE, "--base", str(world.base), "--out", str(world.merged), "--set", "scaling=0.25", str(world.m1)]) == 0
    )
    got = Checkpoint(world.merged).state_dict()
    for k, want in _ta(b, [m1], 0.25).items():
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    # a static merge's folder becomes a dynamic one's, and back: both are checkpoint outputs
    assert (
        run_app(
            app,
            ["merge", "--method", "tswitch", "--base", str(world.base), "--out", str(world.merged), str(world.m0), str(world.m1)],
        )
        == 0
    )
    assert sorted(p.name for p in world.merged.iterdir()) == [".mergeflow-output", "task_0", "task_1"]
    old = world.switch.read_bytes()
    assert run_app(app, ["compress", "--base", str(world.base), "--model", str(world.m1), "--out", str(world.switch)]) == 0
    assert world.switch.read_bytes() != old
    rebuilt = world.p("rebuilt")
    for _ in range(2):
        assert (
            run_app(app, ["switch", "apply", "--base", str(world.base), "--switch", str(world.switch), "--out", str(rebuilt)])
            == 0
        )
    assert not [p for p in world.root.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert capsys.readouterr().err.count("error") == 0


def test_an_empty_folder_may_receive_an_output(world, capsys):
    out = world.p("empty_out")
    out.mkdir()
    assert run_app(app, [*MERGE, "--base", str(world.base), "--out", str(out), str(world.m0)]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / ".mergeflow-output").is_file()
