"""Test set-up: no network, no GPU, temporary Prefect home, analytics off."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="mergeflow-tests-")
os.environ["PREFECT_HOME"] = str(Path(_HOME) / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MERGEFLOW_CACHE"] = str(Path(_HOME) / "cache")  # the session's zoo cache: each small zoo spec built once
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
warnings.filterwarnings("ignore", category=DeprecationWarning)

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "tswitch_golden.safetensors"  # copied from ../shared/fixtures


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def pytest_collection_modifyitems(items):
    """Every test on the session's Prefect server is a ``server`` test (``-m "not server"`` skips them)."""
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
