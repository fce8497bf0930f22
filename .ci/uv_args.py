"""Print the `uv pip install` options that give uv what pip's configuration gives pip.

uv reads no pip configuration, so `make setup` passes this machine's pip settings on: find-links,
index-url, extra-index-url, constraint and no-index, from `pip config list` (environment variables
PIP_* first, then the [install] section, then [global]). Local folders and file:// indexes that do
not exist are left out (uv refuses a missing find-links folder), and the indexes are searched the
way pip does (the best version over all of them, not the first index that has the package), so
the same wheels are picked: e.g. a local CPU build of torch over the CUDA one on the public index.

Usage: python .ci/uv_args.py PYTHON   (the interpreter whose pip configuration counts)
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from urllib.parse import urlparse

KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "no-index")


def pip_config(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and name in KEYS:
            found.setdefault(section, {})[name] = value.strip().strip("'\"")
    merged: dict[str, str] = {}
    for section in ("global", "install", ":env:"):  # later ones win, as in pip
        merged |= found.get(section, {})
    return merged


def exists(location: str) -> bool:
    url = urlparse(location)
    if url.scheme in ("http", "https"):
        return True
    return os.path.exists(url.path if url.scheme == "file" else location)


def main(python: str) -> list[str]:
    config = pip_config(python)
    args: list[str] = []
    for key in ("find-links", "index-url", "extra-index-url", "constraint"):
        for value in config.get(key, "").split():
            if exists(value):
                args += [f"--{key}", value]
    if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args + ["--index-strategy", "unsafe-best-match"]


if __name__ == "__main__":
    print(shlex.join(main(sys.argv[1] if len(sys.argv) > 1 else sys.executable)))
