"""The zoo cache: built once per machine and spec, a hit byte for byte what a build writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mergeflow.stages import zoo_cache
from mergeflow.zoo import ZooSpec

SPEC = ZooSpec(n_tasks=2, max_samples=120, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
               projection_dim=8, pretrain_epochs=1, finetune_epochs=1)  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()
    }


@pytest.fixture
def counted(monkeypatch):
    """The number of real builds ``zoo_cache.build`` makes."""
    import mergeflow.zoo

    calls = []
    real = mergeflow.zoo.build_zoo

    def build_zoo(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mergeflow.zoo, "build_zoo", build_zoo)
    return calls


def test_a_hit_is_the_build_byte_for_byte(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MERGEFLOW_CACHE", "off")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    m0 = zoo_cache.build(fresh, 0, SPEC, lambda s: None)
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    m1 = zoo_cache.build(first, 0, SPEC, lambda s: None)
    said: list[str] = []
    m2 = zoo_cache.build(second, 0, SPEC, said.append)
    assert len(counted) == 2  # off, then the miss; the hit built nothing
    assert tree(fresh) == tree(first) == tree(second) and tree(fresh)
    assert json.loads(json.dumps(m0)) == json.loads(json.dumps(m1)) == m2
    assert said == [f"download: zoo from the cache ({tmp_path / 'cache' / 'zoo' / zoo_cache.key(0, SPEC)})"]
    assert [p.name for p in (tmp_path / "cache" / "zoo").iterdir()] == [zoo_cache.key(0, SPEC)]  # no temporary left


def test_the_key_moves_with_seed_spec_and_code(monkeypatch):
    from dataclasses import replace

    from mergeflow.stages import spec

    keys = {zoo_cache.key(0, SPEC), zoo_cache.key(1, SPEC), zoo_cache.key(0, replace(SPEC, finetune_epochs=2))}
    assert len(keys) == 3 and zoo_cache.key(0, SPEC) == zoo_cache.key(0, replace(SPEC))
    monkeypatch.setattr(spec, "code_digest", lambda stage: "other code")
    assert zoo_cache.key(0, SPEC) not in keys


def test_a_damaged_entry_is_neither_used_nor_deleted(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "first"
    first.mkdir()
    zoo_cache.build(first, 0, SPEC, lambda s: None)
    entry = tmp_path / "cache" / "zoo" / zoo_cache.key(0, SPEC)
    victim = next((entry / "checkpoints" / "base").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    damaged = tree(entry)
    again = tmp_path / "again"
    again.mkdir()
    said: list[str] = []
    zoo_cache.build(again, 0, SPEC, said.append)
    assert len(counted) == 2 and tree(again) == tree(first)
    assert [s for s in said if "damaged" in s] == [
        f"download: zoo cache entry {entry} is damaged (its files differ from the sha256s it recorded); "
        "building afresh (remove it to rebuild the cache)"
    ]
    assert tree(entry) == damaged


def test_off_and_unwritable(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MERGEFLOW_CACHE", "off")
    assert zoo_cache.cache_root() is None
    monkeypatch.delenv("MERGEFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo_cache.cache_root() == tmp_path / "xdg" / "mergeflow"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MERGEFLOW_CACHE", str(blocker))  # the cache cannot be made: the build still lands
    out = tmp_path / "out"
    out.mkdir()
    said: list[str] = []
    zoo_cache.build(out, 0, SPEC, said.append)
    assert (out / "checkpoints" / "base").is_dir() and blocker.read_text() == "not a folder"
    assert any(s.startswith(f"download: zoo not cached ({blocker / 'zoo'}: ") for s in said), said
