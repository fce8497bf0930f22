"""CLIP-vision data: a task's split in ``data/<task>/<split>.parquet``, either ready pixel values
(the built-in zoo) or encoded images that the base's own image processor prepares on first use;
image datasets read and sampled at download.

datasets and PIL are imported lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import MergeflowError


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [N, C, H, W] float32, labels [N] int64) of ``data_dir/<split>.parquet``.

    The splits are written by the ``datasets`` library (``Dataset.to_parquet``) and read back
    here straight through pyarrow (no datasets cache). The image shape comes from
    ``data_dir/meta.json`` ("shape": [C, H, W]); without it a square single-channel image is
    assumed."""
    import numpy as np

    from mergeflow.models.data import read_table

    data_dir = Path(data_dir)
    file = data_dir / f"{split}.parquet"
    table = read_table(file, ("pixel_values", "label"))
    pix = table.column("pixel_values").combine_chunks()
    lengths = np.asarray(pix.value_lengths())
    if len(lengths) and (lengths != lengths[0]).any():
        raise MergeflowError(f"{file}: pixel_values rows have different lengths")
    flat = np.asarray(pix.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    y = torch.from_numpy(np.asarray(table.column("label").to_numpy(), dtype=np.int64).copy())
    x = torch.from_numpy(flat.copy()).reshape(len(y), -1) if len(y) else torch.zeros(0, 0)
    meta_file = data_dir / "meta.json"
    if meta_file.exists():
        shape = json.loads(meta_file.read_text())["shape"]
    else:
        side = int(round(x.shape[1] ** 0.5))
        if side == 0 or side * side != x.shape[1]:
            raise MergeflowError(f"{file}: pixel_values of length {x.shape[1]} is no square image and {meta_file} is missing")
        shape = [1, side, side]
    try:
        x = x.reshape(len(y), *shape)
    except RuntimeError:
        raise MergeflowError(f"{file}: pixel_values don't fit the image shape {shape} of {meta_file}") from None
    return x, y


@dataclass
class Images:
    """A task's split: labels, and either ready pixel values (the zoo) or encoded images that the
    model's own processor resizes and crops on first use. Those are kept as uint8 (a quarter of
    float32) and rescaled and normalised per batch, as the processor itself would."""

    labels: torch.Tensor
    pixels: torch.Tensor | None = None
    images: list | None = None
    processor: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def pixel_values(self, rows: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        if self.pixels is None:
            assert self.images is not None  # a split holds pixels or the images to make them from
            self.pixels = _process(self.processor, self.images, batch)
            self.images = None
        x = self.pixels if rows is None else self.pixels[rows]
        if x.dtype != torch.uint8:
            return x
        p = self.processor
        mean = torch.tensor(p.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(p.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        x = x.to(torch.float32)
        if p.do_rescale:
            x = x * torch.tensor(p.rescale_factor, dtype=torch.float32)
        return (x - mean) / std if p.do_normalize else x


def _process(processor, images: list, batch: int) -> torch.Tensor:
    """Decode encoded images ({"bytes", "path"} or PIL) and resize / crop them with the model's
    processor, stopping before rescaling and normalisation: uint8 [N, C, H, W]."""
    import io

    from PIL import Image

    out = []
    for i in range(0, len(images), batch):
        pil = []
        for im in images[i : i + batch]:
            if isinstance(im, dict):
                im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else Image.open(im["path"])
            pil.append(im.convert("RGB"))
        x = processor(images=pil, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def load_image_splits(ts, pool: int, seed: int):
    """(test rows, train pool rows or None, class names) of a task's image dataset."""
    from mergeflow.models.data import load_split as load_ds

    o = ts.options
    test = load_ds(ts.dataset, o["split"], o["subset"], [o["image_column"], o["label_column"]])
    classes = o["classnames"]
    if classes is None:
        feature = test.features[o["label_column"]]
        if not hasattr(feature, "names"):
            raise MergeflowError(
                f"{ts.dataset.ref}: column {o['label_column']!r} has no class names; set download.tasks.{ts.name}.classnames"
            )
        classes = [n.replace("_", " ") for n in feature.names]
    train = None
    try:
        train = load_ds(ts.dataset, o["train_split"], o["subset"], [o["image_column"], o["label_column"]], evaluation=False)
    except MergeflowError:
        train = None
    if train is not None and len(train) > pool:
        gen = torch.Generator().manual_seed(seed)
        train = train.select(sorted(torch.randperm(len(train), generator=gen)[:pool].tolist()))
    rename = {o["image_column"]: "image", o["label_column"]: "label"}
    fix = lambda d: d.rename_columns({k: v for k, v in rename.items() if k != v})  # noqa: E731
    return fix(test), (fix(train) if train is not None else None), classes


def save_images(path: Path, ds) -> None:
    """A split's encoded images and labels as parquet (images stay in their own encoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeflow.io.atomic import atomic_file

    table = ds.with_format("arrow")[:]  # the selected rows, still encoded
    table = pa.table({"image": table.column("image"), "label": table.column("label").cast(pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, str(tmp))
