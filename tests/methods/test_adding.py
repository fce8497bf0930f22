"""docs/adding-a-method.md works as written: its example, saved as one new file in a copy of the
package, is listed by `mergeflow methods`, merges through `mergeflow merge` as its definition
says, passes the contract tests, and becomes part of every stage's code (dvc.yaml unchanged)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(300)]


def example() -> tuple[str, str]:
    """(file name, code) of the page's example."""
    page = (ROOT / "docs" / "adding-a-method.md").read_text()
    name = re.search(r"Save this as `mergeflow/methods/(\w+\.py)`", page).group(1)
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    return name, code


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for sub in ("mergeflow", "flows", "tasks"):
        shutil.copytree(ROOT / sub, root / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests" / "methods", root / "tests" / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "conftest.py", root / "tests" / "conftest.py")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    name, code = example()
    (root / "mergeflow" / "methods" / name).write_text(code)
    return root


def run(copy: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(copy))
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=240)


def test_listed_and_merged_by_the_cli(copy, tmp_path):
    listing = run(copy, "-c", "from flows.cli import main; main()", "methods")
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^sign_agree  \[static\]", listing.stdout, re.M), listing.stdout[-500:]
    assert "agree = 0.5 in [0.0, 1.0]" in listing.stdout

    base = {"w": torch.tensor([0.0, 1.0, -1.0, 2.0])}
    taus = [torch.tensor([1.0, 1.0, -1.0, 0.5]), torch.tensor([1.0, -2.0, -1.0, 0.5]), torch.tensor([-1.0, 3.0, 2.0, 0.5])]
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, tau in enumerate(taus):
        save_file({"w": base["w"] + tau}, str(tmp_path / f"m{i}.safetensors"))
    merged = run(
        copy,
        "-c",
        "from flows.cli import main; main()",
        "merge",
        "--method",
        "sign_agree",
        "--base",
        str(tmp_path / "base.safetensors"),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "agree=0.75",
        "--set",
        "scaling=1.0",
        *(str(tmp_path / f"m{i}.safetensors") for i in range(3)),
    )
    assert merged.returncode == 0, merged.stderr
    # sum (1, 2, 0, 1.5); sign agreement per entry 2, 2, 0 (sum 0: no sign), 3 of 3 -> only the last has >= 0.75 * 3
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))["w"]
    assert torch.allclose(out, base["w"] + torch.tensor([0.0, 0.0, 0.0, 1.5]))


def test_covered_by_the_contract_tests(copy):
    res = run(copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/methods/test_contract.py", "-k", "sign_agree")
    assert res.returncode == 0, res.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", res.stdout).group(1))
    assert passed >= 8 and "failed" not in res.stdout


def test_part_of_every_stage_without_editing_dvc_yaml(copy):
    code = (
        "from mergeflow.stages import STAGES, spec\n"
        "print(all(any(f.name == 'sign_agree.py' for f in spec.code_files(s)) for s in STAGES))\n"
        "print(open('dvc.yaml').read() == spec.dvc_yaml())"
    )
    res = run(copy, "-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]
