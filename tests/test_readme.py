"""Every library command the README shows runs as written (BASE, M1, M2, OUT filled in with tiny
checkpoints), and every params key it shows is one params.yaml accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"mergeflow (merge|compress|switch|methods)\b", line)]


COMMANDS = readme_commands()


@pytest.fixture
def world(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in (1, 2):
        save_file({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / f"m{i}.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_shows_the_library_commands():
    shown = {c.split()[1] for c in COMMANDS}
    assert shown == {"merge", "compress", "switch", "methods"}, COMMANDS
    assert len(COMMANDS) >= 9


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, world):
    words = shlex.split(command)[1:]
    if words[1:2] == ["..."]:  # "merge ... --device cuda --set ...": options of any merge (on the CPU here)
        rest = words[2:]
        rest[rest.index("--device") + 1] = "cpu"
        words = ["merge", "--method", "task_arithmetic", "--base", "BASE", "--out", "OUT", *rest, "M1", "M2"]
    words = [w for w in words if w != "..."]  # "M1 M2 ...": more models
    fill = {"BASE": "base.safetensors", "M1": "m1.safetensors", "M2": "m2.safetensors", "OUT": "out", "T1": "t1"}
    words = [fill.get(w, w) for w in words]
    if words[:2] == ["switch", "apply"]:  # it reads the switch `compress` writes
        assert (
            CliRunner()
            .invoke(
                app, ["compress", "--base", "base.safetensors", "--model", "m1.safetensors", "--out", "t1.switch.safetensors"]
            )
            .exit_code
            == 0
        )
    res = CliRunner().invoke(app, words)
    assert res.exit_code == 0, f"{command}\n{res.output}"


def test_readme_params_keys_are_accepted(tmp_path):
    """The params.yaml the README documents, and the `--set` keys it shows, validate."""
    from mergeflow.params import load_params

    text = (ROOT / "README.md").read_text()
    sets = set(re.findall(r"--set ([a-z_]+\.[a-z_.]+=[^\s\]`]+)", text))
    assert "compress.drop=0.8" in sets
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in sorted(sets):
        key, value = item.split("=", 1)
        node = params
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(tmp_path / "params.yaml")
