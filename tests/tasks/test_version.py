"""DVC failures show DVC's own reason (issue 17, friction 2): the one-line error carries what
DVC said, not an empty string hidden by ``--quiet``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergeflow.errors import MergeflowError


def test_dvc_reason_keeps_the_error_lines():
    from tasks.version import dvc_reason

    assert dvc_reason("noise\nERROR: failed to commit - dependency 'x.py' does not exist\n") == (
        "failed to commit - dependency 'x.py' does not exist"
    )
    assert dvc_reason("", "a\nb\nc\nd\n") == "b c d" and dvc_reason("", "") == "DVC gave no reason"


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_a_failed_commit_says_why(tmp_path):
    from tasks.version import dvc

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo\n    deps: [mergeflow/zoo.py]\n    outs: [out.txt]\n")
    (tmp_path / "out.txt").write_text("x")
    with pytest.raises(MergeflowError) as exc:
        dvc(["commit", "--force"], tmp_path, "dvc commit")
    assert str(exc.value) == (
        f"dvc commit failed in {tmp_path} (dvc commit --force): failed to commit - dependency 'mergeflow/zoo.py' does not exist"
    )
