"""Model-family adapter for CLIP-vision classifiers with per-task heads.

A task model is ``CLIPVisionModelWithProjection`` (the vision tower plus ``visual_projection``)
and a frozen head ``weight`` [n_classes, projection_dim] with a ``logit_scale``, as CLIP's
zero-shot heads are: logits = logit_scale * normalize(image_embeds) @ weight.T. Used by the
built-in zoo (``zoo://digits``) and by real CLIP ViT checkpoints.

transformers and datasets are imported lazily (importing them costs seconds).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError


def load_config(ckpt_dir: Path):
    """The ``CLIPVisionConfig`` of a checkpoint directory (a full ``CLIPConfig``'s vision part too)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from mergeflow.models.family import read_config

    path, raw = read_config(ckpt_dir)
    try:
        if raw.get("model_type") == "clip" or "vision_config" in raw:
            full = CLIPConfig.from_dict(raw)
            vision = full.vision_config
            vision.projection_dim = full.projection_dim  # the projection's size is the full model's
            return vision
        return CLIPVisionConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise MergeflowError(f"{path}: not a CLIP vision config ({exc})") from None


def build_model(config, state_dict: dict[str, torch.Tensor], device="cpu") -> torch.nn.Module:
    """``CLIPVisionModelWithProjection`` in eval mode holding exactly ``state_dict``.

    Strict: a missing or unexpected tensor name, or a shape that doesn't fit the config, raises
    MergeflowError naming the tensor. Tensors keep their dtype, and on their own device they are
    used as they are (no copy): the model shares memory with ``state_dict``. The model is built
    on the meta device first, so no time goes into a random initialisation."""
    from transformers import CLIPVisionModelWithProjection

    config = _copy_config(config)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise MergeflowError(f"build_model: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
    if unexpected:
        raise MergeflowError(f"build_model: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected)")
    for name, ref in expected.items():
        if tuple(state_dict[name].shape) != tuple(ref.shape):
            raise MergeflowError(
                f"build_model: tensor {name} has shape {tuple(state_dict[name].shape)}, the config wants {tuple(ref.shape)}"
            )
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True, assign=True)
    # non-persistent buffers are not in the state dict: rebuild them on the device
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                module.register_buffer(buf_name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
            else:  # pragma: no cover - CLIP vision has no other non-persistent buffer
                raise MergeflowError(f"build_model: buffer {mod_name}.{buf_name} has no value")
    return model.eval()


def _copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    if getattr(config, "_attn_implementation", None) in (None, ""):
        config._attn_implementation = "eager"
    return config


def load_head(path: Path) -> tuple[torch.Tensor, float]:
    """(weight [n_classes, dim] float32, logit_scale) from a head ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"{path}: head file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if "weight" not in fh.keys():
                raise MergeflowError(f"{path}: no tensor 'weight' in head file")
            weight = fh.get_tensor("weight").to(torch.float32)
    except SafetensorError as exc:
        raise MergeflowError(f"{path}: not a safetensors file ({exc})") from None
    if weight.dim() != 2:
        raise MergeflowError(f"{path}: tensor 'weight' has shape {tuple(weight.shape)}, expected [n_classes, dim]")
    try:
        scale = float(meta.get("logit_scale", "1.0"))
    except ValueError:
        raise MergeflowError(f"{path}: metadata logit_scale {meta.get('logit_scale')!r} is not a number") from None
    return weight, scale


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


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised ``image_embeds`` of ``pixel_values``, in float32."""
    param = next(model.parameters())
    out = []
    for i in range(0, len(pixel_values), batch_size):
        batch = pixel_values[i : i + batch_size].to(device=param.device, dtype=param.dtype)
        out.append(model(pixel_values=batch).image_embeds.float())
    if not out:
        return torch.zeros(0, model.config.projection_dim)
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def accuracy(model, head: torch.Tensor, logit_scale: float, pixel_values: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of logits = logit_scale * image_embeddings @ head.T."""
    if len(labels) == 0:
        raise MergeflowError("accuracy: empty evaluation set")
    emb = image_embeddings(model, pixel_values, batch_size)
    head = head.to(device=emb.device, dtype=torch.float32)
    pred = (logit_scale * emb @ head.T).argmax(-1).cpu()
    return float((pred == labels.cpu()).float().mean())


# --- the families ------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from mergeflow.models.family import Family, Sources  # noqa: E402

VISION_PREFIXES = ("vision_model.", "visual_projection.")

# Zero-shot prompt templates of the 8-task suite, as in CLIP's and the task-vectors papers' code.
TEMPLATES: dict[str, list[str]] = {
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "stanford_cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."],
    "resisc45": [f"{kind} {view} of {art}{{}}." for art in ("", "a ", "the ")
                 for kind, view in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                    ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"))],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'],
    "mnist": ['a photo of the number: "{}".'],
    "dtd": [f"a photo of {art} {{}} {what}." for art in ("a", "the") for what in ("texture", "pattern", "thing", "object")],
}
TEMPLATES["cars"] = TEMPLATES["stanford_cars"]
DEFAULT_TEMPLATES = ["a photo of a {}."]


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
        for im in images[i:i + batch]:
            if isinstance(im, dict):
                im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else Image.open(im["path"])
            pil.append(im.convert("RGB"))
        x = processor(images=pil, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


class _VisionFamily(Family):
    """Shared evaluation of CLIP-vision classifiers: top-1 accuracy of logit_scale * emb @ head.T."""

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        self.config = load_config(self.artifacts / "checkpoints" / "base")
        self._heads: dict[str, tuple[torch.Tensor, float]] = {}

    def build(self, state_dict):
        return build_model(self.config, state_dict, device=self.device)

    def head(self, task: str) -> tuple[torch.Tensor, float]:
        if task not in self._heads:
            weight, scale = load_head(self.artifacts / "heads" / f"{task}.safetensors")
            self._heads[task] = (weight.to(self.device), scale)
        return self._heads[task]

    def features(self, model, data: Images, rows=None):
        return image_embeddings(model, data.pixel_values(rows, self.batch_size), self.batch_size).cpu()

    @torch.no_grad()
    def predict(self, model, task, data: Images, rows=None):
        head, scale = self.head(task)
        emb = image_embeddings(model, data.pixel_values(rows, self.batch_size), self.batch_size)
        return (scale * emb @ head.to(emb).T).argmax(-1).cpu()

    def score(self, task, outputs, data: Images):
        if len(data) == 0:
            raise MergeflowError(f"evaluate: task {task}: empty evaluation set")
        return {"score": float((outputs.cpu() == data.labels).float().mean()), "metric": "accuracy"}


class ZooVision(_VisionFamily):
    """The built-in zoo (``zoo://digits``): pixel values stored ready in ``data/<task>/<split>.parquet``."""

    name = "zoo"

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:  # pragma: no cover - the zoo is built by mergeflow.zoo
        raise MergeflowError("the zoo is built by the download stage from zoo:// sources, not prepared from downloads")

    def load_data(self, task, split, limit=None):
        x, y = load_split(self.artifacts / "data" / task, split)
        if limit:
            x, y = x[:limit], y[:limit]
        return Images(labels=y, pixels=x)


class ClipVision(_VisionFamily):
    """CLIP ViT from the hub or local folders (e.g. ``openai/clip-vit-base-patch32`` and the
    ``tanganke/clip-vit-base-patch32_<task>`` fine-tunes, datasets ``tanganke/<task>``).

    The vision tower (``vision_model.*`` and ``visual_projection``) is merged. Each task's head is
    CLIP's zero-shot classifier built once at download from its class names and prompt templates
    with the base's text tower: the mean over templates of the normalised text embeddings,
    normalised again, with the base's ``logit_scale``. Images go through the base's own processor.
    A fine-tune saved as a bare ``CLIPVisionModel`` (no ``visual_projection``) takes the base's.
    """

    name = "clip_vision"
    options = {"query_pool": 1000}  # train rows kept for Auto-Switch's query set (seeded sample)
    task_options = {
        "split": "test",  # evaluation split
        "train_split": "train",  # where the query set is drawn from (skipped when missing)
        "subset": None,  # dataset config name
        "image_column": "image",
        "label_column": "label",
        "classnames": None,  # default: the dataset's ClassLabel names, underscores as spaces
        "templates": None,  # default: the suite's templates for known task names, else "a photo of a {}."
    }

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:
        from mergeflow.io.checkpoint import Checkpoint

        base_dir = sources.base.path
        config = load_config(base_dir)
        names = _vision_names(config)
        base = Checkpoint(base_dir)
        base_tensors = _vision_tensors(base, names, base_dir, fallback=None)
        _write_vision(out / "checkpoints" / "base", config, base_tensors, copy_from=base_dir)
        model, tokenizer, scale = _text_tower(base_dir, base)
        heads_dir = out / "heads"
        heads_dir.mkdir(parents=True, exist_ok=True)
        facts = {"metrics": {}, "classes": {}}
        for task, ts in sources.tasks.items():
            ck = Checkpoint(ts.model.path)
            tensors = _vision_tensors(ck, names, ts.model.path, fallback=base_tensors)
            _write_vision(out / "checkpoints" / task, config, tensors)
            del tensors
            if ts.dataset is None:
                raise MergeflowError(f"download.tasks.{task}.dataset: required for family clip_vision")
            test, train, classes = _load_image_splits(ts, sources.options["query_pool"], sources.seed)
            templates = ts.options["templates"] or TEMPLATES.get(task.lower(), DEFAULT_TEMPLATES)
            weight = zero_shot_head(model, tokenizer, classes, templates)
            _save_head(heads_dir / f"{task}.safetensors", weight, scale, task, classes)
            _save_images(out / "data" / task / "test.parquet", test)
            if train is not None:
                _save_images(out / "data" / task / "train.parquet", train)
            facts["metrics"][task] = "accuracy"
            facts["classes"][task] = len(classes)
            log(f"download: {task}: vision tower {len(names)} tensors, head {len(classes)} classes x "
                f"{len(templates)} templates, {len(test)} test images" + (f", {len(train)} query-pool images" if train is not None else ""))
        return facts

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            # the PIL backend: the default one needs torchvision
            self._processor = AutoImageProcessor.from_pretrained(str(self.artifacts / "checkpoints" / "base"), backend="pil")
        return self._processor

    def load_data(self, task, split, limit=None):
        from mergeflow.models.data import read_table

        table = read_table(self.artifacts / "data" / task / f"{split}.parquet", ("image", "label"), limit)
        labels = torch.as_tensor(table.column("label").to_pylist(), dtype=torch.int64)
        return Images(labels=labels, images=table.column("image").to_pylist(), processor=self.processor)


def _vision_names(config) -> list[str]:
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(_copy_config(config))
    return list(model.state_dict())


def _vision_tensors(ck, names: list[str], where: Path, fallback: dict | None) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a CLIP checkpoint (full CLIPModel or vision-only), float32."""
    have = set(ck.names())
    out = {}
    for name in names:
        bare = name.removeprefix("vision_model.")
        if name in have:
            t = ck.get(name)
        elif bare != name and bare in have:
            t = ck.get(bare)  # a CLIPVisionModel saved by transformers 5 names its tensors without the prefix
        elif name.startswith("visual_projection.") and fallback is not None:
            t = fallback[name]  # a bare CLIPVisionModel fine-tune: the projection stayed the base's
        else:
            raise MergeflowError(f"{where}: tensor {name} missing: not a CLIP vision checkpoint of the base's architecture")
        if fallback is not None and tuple(t.shape) != tuple(fallback[name].shape):
            raise MergeflowError(f"{where}: tensor {name} has shape {tuple(t.shape)}, the base has {tuple(fallback[name].shape)}")
        out[name] = t.to(torch.float32)
    return out


def _write_vision(folder: Path, config, tensors: dict[str, torch.Tensor], copy_from: Path | None = None) -> None:
    import shutil

    from safetensors.torch import save_file

    from mergeflow.io.atomic import atomic_dir

    cfg = _copy_config(config)
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    with atomic_dir(folder) as tmp:
        cfg.to_json_file(str(tmp / "config.json"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("preprocessor_config.json",):
            if copy_from is not None and (Path(copy_from) / name).exists():
                shutil.copyfile(Path(copy_from) / name, tmp / name)


def _text_tower(base_dir: Path, base_ck):
    """(CLIPTextModelWithProjection, tokenizer, logit_scale) of the base CLIP checkpoint."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

    raw = json.loads((Path(base_dir) / "config.json").read_text())
    if raw.get("model_type") != "clip":
        raise MergeflowError(f"{base_dir}/config.json: the base must be a full CLIP model (text tower for zero-shot heads), "
                             f"got model_type {raw.get('model_type')!r}")
    cfg = CLIPConfig.from_dict(raw)
    tcfg = cfg.text_config
    tcfg.projection_dim = cfg.projection_dim
    tcfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(tcfg)
    have = set(base_ck.names())
    sd = {}
    for name in model.state_dict():
        if name not in have:
            raise MergeflowError(f"{base_dir}: tensor {name} missing (the zero-shot heads need CLIP's text tower)")
        sd[name] = base_ck.get(name).to(torch.float32)
    model.load_state_dict(sd, strict=False, assign=True)
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta and bname == "position_ids":
                mod.register_buffer(bname, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise MergeflowError(f"{base_dir}: cannot load the tokenizer ({' '.join(str(exc).split())[:160]})") from None
    scale = float(base_ck.get("logit_scale").exp()) if "logit_scale" in have else 100.0
    return model.eval(), tokenizer, scale


@torch.no_grad()
def zero_shot_head(text_model, tokenizer, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[n_classes, projection_dim]: per class, the normalised mean of the normalised text
    embeddings of every template filled with the class name (CLIP's zero-shot classifier)."""
    rows = []
    for c in classes:
        tok = tokenizer([t.format(c) for t in templates], padding=True, truncation=True, return_tensors="pt")
        emb = torch.nn.functional.normalize(text_model(**tok).text_embeds.float(), dim=-1)
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def _load_image_splits(ts, pool: int, seed: int):
    """(test rows, train pool rows or None, class names) of a task's image dataset."""
    from mergeflow.models.data import load_split as load_ds

    o = ts.options
    test = load_ds(ts.dataset, o["split"], o["subset"], [o["image_column"], o["label_column"]])
    classes = o["classnames"]
    if classes is None:
        feature = test.features[o["label_column"]]
        if not hasattr(feature, "names"):
            raise MergeflowError(f"{ts.dataset.ref}: column {o['label_column']!r} has no class names; "
                                 f"set download.tasks.{ts.name}.classnames")
        classes = [n.replace("_", " ") for n in feature.names]
    train = None
    try:
        train = load_ds(ts.dataset, o["train_split"], o["subset"], [o["image_column"], o["label_column"]])
    except MergeflowError:
        train = None
    if train is not None and len(train) > pool:
        gen = torch.Generator().manual_seed(seed)
        train = train.select(sorted(torch.randperm(len(train), generator=gen)[:pool].tolist()))
    rename = {o["image_column"]: "image", o["label_column"]: "label"}
    fix = lambda d: d.rename_columns({k: v for k, v in rename.items() if k != v})  # noqa: E731
    return fix(test), (fix(train) if train is not None else None), classes


def _save_images(path: Path, ds) -> None:
    """A split's encoded images and labels as parquet (images stay in their own encoding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeflow.io.atomic import atomic_file

    table = ds.with_format("arrow")[:]  # the selected rows, still encoded
    table = pa.table({"image": table.column("image"), "label": table.column("label").cast(pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, str(tmp))


def _save_head(path: Path, weight: torch.Tensor, scale: float, task: str, classes: list[str]) -> None:
    from mergeflow.io.checkpoint import save_tensors

    save_tensors(path, {"weight": weight.to(torch.float32)},
                 metadata={"logit_scale": repr(float(scale)), "task": task, "classes": json.dumps(classes)})
