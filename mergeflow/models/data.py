"""Evaluation datasets from resolved local folders (hub snapshots or user folders), via ``datasets``.

A hub dataset is read from its resolved snapshot folder (``datasets.load_dataset(folder)``): the
files are pinned to the commit the download stage recorded, and it works offline, where
``load_dataset("org/name", revision=...)`` would want datasets' own prepared cache.
"""

from __future__ import annotations

from mergeflow.errors import MergeflowError
from mergeflow.models.family import Source


def load_split(source: Source, split: str, subset: str | None = None, columns: list[str] | None = None):
    """One split of a dataset folder as a ``datasets.Dataset``; a missing split or column is a
    one-line MergeflowError naming the dataset."""
    import datasets
    from datasets.utils import logging as ds_logging

    where = f"{source.ref}" + (f" ({subset})" if subset else "")
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        try:
            dd = datasets.load_dataset(str(source.path), name=subset)
        except ValueError as exc:
            msg = " ".join(str(exc).split())
            if subset and "config" in msg.lower():
                raise MergeflowError(f"{where}: no subset {subset!r} ({msg[:160]})") from None
            raise MergeflowError(f"{where}: cannot read the dataset ({msg[:200]})") from None
        except FileNotFoundError as exc:
            raise MergeflowError(f"{where}: no data files ({' '.join(str(exc).split())[:160]})") from None
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    if split not in dd:
        raise MergeflowError(f"{where}: no split {split!r} (has {', '.join(dd)})")
    ds = dd[split]
    for col in columns or ():
        if col not in ds.column_names:
            raise MergeflowError(f"{where}: split {split!r} has no column {col!r} (has {', '.join(ds.column_names)})")
    return ds


def read_table(file, columns: tuple[str, ...] = (), limit: int | None = None):
    """A split written by a family's ``prepare`` (parquet) as a pyarrow table, first ``limit`` rows;
    a missing or unreadable file or a missing column is a one-line MergeflowError naming the file."""
    from pathlib import Path

    import pyarrow.parquet as pq

    file = Path(file)
    if not file.exists():
        raise MergeflowError(f"{file}: split {file.name.split('.')[0]!r} not found (run the download stage)")
    try:
        table = pq.read_table(str(file))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        raise MergeflowError(f"{file}: not a readable parquet file ({' '.join(str(exc).split())[:160]})") from None
    for col in columns:
        if col not in table.column_names:
            raise MergeflowError(f"{file}: column {col!r} missing (has {', '.join(table.column_names)})")
    return table.slice(0, limit) if limit else table
