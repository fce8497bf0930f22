"""Evaluation datasets from resolved local folders (hub snapshots or user folders), via ``datasets``.

A hub dataset is read from its resolved snapshot folder (``datasets.load_dataset(folder)``): the
files are pinned to the commit the download stage recorded, and it works offline, where
``load_dataset("org/name", revision=...)`` would want datasets' own prepared cache.
"""

from __future__ import annotations

from mergeflow.errors import MergeflowError
from mergeflow.models.family import Source


FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
EVAL_SPLITS = ("validation", "validation_matched", "dev", "test")  # the default evaluation split: the first there


def load_dataset_dict(source: Source, subset: str | None = None):
    """The dataset at ``source`` as a ``datasets.DatasetDict``: a folder ``datasets`` can load (a hub
    snapshot, split files), a ``save_to_disk`` folder, or one file (parquet, CSV/TSV, JSON lines:
    a single split, named ``file``). Unreadable input is a one-line MergeflowError naming it."""
    from pathlib import Path

    import datasets
    from datasets.utils import logging as ds_logging

    where = f"{source.ref}" + (f" ({subset})" if subset else "")
    path = Path(source.path)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        try:
            if path.is_file():
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise MergeflowError(f"{where}: {path.name}: not a dataset file (parquet, csv, tsv, json or jsonl)")
                extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
                return datasets.DatasetDict(
                    {"file": datasets.load_dataset(builder, data_files=str(path), split="train", **extra)}
                )
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
                return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"file": loaded})
            return datasets.load_dataset(str(path), name=subset)
        except ValueError as exc:
            msg = " ".join(str(exc).split())
            if subset and "config" in msg.lower():
                raise MergeflowError(f"{where}: no subset {subset!r} ({msg[:160]})") from None
            raise MergeflowError(f"{where}: cannot read the dataset ({msg[:200]})") from None
        except FileNotFoundError as exc:
            raise MergeflowError(f"{where}: no data files ({' '.join(str(exc).split())[:160]})") from None
        except Exception as exc:  # noqa: BLE001 - a malformed CSV or JSON file: pyarrow and datasets raise many kinds
            if isinstance(exc, MergeflowError):
                raise
            raise MergeflowError(
                f"{where}: cannot read the dataset ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
            ) from None
    finally:
        if bars:
            ds_logging.enable_progress_bar()


def pick_split(dd, split: str | None, where: str, purpose: str = "evaluation") -> str:
    """The split to use: ``split`` as given, else (for evaluation) the first of EVAL_SPLITS the
    dataset has, else its only split (one file). A one-line error lists what it has."""
    if split:
        if split not in dd:
            raise MergeflowError(f"{where}: no split {split!r} (has {', '.join(dd)})")
        return split
    for name in (*EVAL_SPLITS, *(["file"] if len(dd) == 1 else [])):
        if name in dd:
            return name
    raise MergeflowError(
        f"{where}: no {purpose} split (looked for {', '.join(EVAL_SPLITS)}; has {', '.join(dd)}): set download.tasks.<task>.split"
    )


def load_split(
    source: Source, split: str | None, subset: str | None = None, columns: list[str] | None = None, evaluation: bool = True
):
    """One split of a dataset (see :func:`load_dataset_dict`; ``split`` None: the evaluation split
    :func:`pick_split` finds). A one-file dataset is the evaluation split whatever its name in
    params, and never a train split (``evaluation`` False). A missing split or column is a
    one-line MergeflowError."""
    where = f"{source.ref}" + (f" ({subset})" if subset else "")
    dd = load_dataset_dict(source, subset)
    one_file = list(dd) == ["file"]
    if one_file and not evaluation:
        raise MergeflowError(f"{where}: no split {split!r} (one file: the evaluation split only)")
    ds = dd["file"] if one_file else dd[pick_split(dd, split, where)]
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
