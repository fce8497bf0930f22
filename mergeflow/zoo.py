"""The built-in offline model zoo (``zoo://digits``).

Over 400 lines, one module: kept whole, as it was, until the issue that rewrites the zoo splits it.

Built deterministically from a seed out of scikit-learn's digits (1797 8x8 grey images shipped
with the pip package, no network), in the image of the CLIP ViT-B/32 eight-task suite (SUN397,
Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD): eight datasets whose images differ in style,
a small vision transformer in Hugging Face CLIP-vision form (``CLIPVisionModelWithProjection``)
pre-trained on images of every style but on none of the tasks' labels, one expert fine-tuned
per task, and a frozen head per task like CLIP's zero-shot heads.

Tasks (``TASKS``): each is a dataset, the digit put through the task's content transform (and
label map), then drawn in the task's own domain style (``DOMAINS``), on the 8x8 image before
any upsampling:

=======  ===============================================  ========  =========================================
task     content (labels)                                 domain    look
=======  ===============================================  ========  =========================================
rot90    rotated 90 degrees anticlockwise (digit)         hstripes  light stripes on the even rows
rot180   rotated 180 degrees (digit)                      checker   light one-pixel checkerboard
hflip    mirrored left-right (digit)                      frame     white one-pixel border
invert   the digit as it is (digit)                       negative  1 - x: dark digit on white
shuffle  its 2x2 blocks in a fixed permutation (digit)    faded     0.3 + 0.4 x: low contrast on grey
roll     shifted cyclically by 4 rows, 2 columns (digit)  vstripes  light stripes on the even columns
parity   transposed (even / odd)                          gradient  background ramp, dark top to light bottom
mod3     upside down (value mod 3)                        dots      a fixed sparse grid of light dots
=======  ===============================================  ========  =========================================

Pattern styles are screen-blended, x + p * (1 - x) for a pattern p in [0, 1] (0.4 for the
stripes and the checkerboard, 0 to 0.6 for the ramp, 0.6 for the dots, 1 for the frame), so
strokes stay readable on the lighter background; only the frame hides the border pixels.
Transforms and styles are the same for every seed; the seed drives the split, the
initialisation and the data order.

Pre-training, CLIP-like: CLIP learns from web images of every kind but never from the tasks'
labels. Here the base is trained from scratch, ``pretrain_epochs`` passes over the plain train
digits, on two objectives at once, each a cross-entropy on cosine logits of its normalised
``image_embeds`` against a temporary head that is discarded afterwards:

* digit classification (10 classes) on the plain digits (the ``plain`` domain, upright, white
  on black, no style), one batch of ``batch_size`` per step;
* domain identification (which of the 1 + n_tasks domains an image comes from) on as many
  unlabeled images per step, drawn at random over the plain digits and every task's dataset,
  all rendered from the train split; weighted by ``pretrain_domain_weight``.

So the base never sees a task's labels, nor a transformed digit with its class, but its
embeddings tell the domains apart, as CLIP's tell SVHN from DTD; Auto-Switch's routing (k-NN
over the base's embeddings of a few train samples per task) relies on exactly that. With
``pretrain_domain_weight`` 0 the base learns the plain digits only, and routing confuses tasks.

Each task has its own FROZEN head, as CLIP's zero-shot text heads are: the class means of the
*base* model's L2-normalised image embeddings on the task's train split, centred (minus their
mean) and L2-normalised; logits = logit_scale * normalize(image_embeds) @ head.T. Fine-tuning
trains the whole vision tower (embeddings, encoder, ``visual_projection``), never the head, with
AdamW, cosine schedule and a lower learning rate on the embeddings (``finetune_embed_lr_scale``,
the usual layer-wise lr decay of ViT fine-tuning, taken to the embeddings only).

The build runs torch on ``threads`` threads (1 by default: at this size more threads only add
synchronisation) and restores the caller's thread count and global RNG state afterwards; the
same seed and spec give bitwise identical files on one machine.

Layout written under ``root``::

    checkpoints/base/{config.json, model.safetensors}
    checkpoints/<task>/{config.json, model.safetensors}
    heads/<task>.safetensors            # "weight" [n_classes, projection_dim], metadata logit_scale/task/classes
    data/<task>/{train,test}.parquet    # "pixel_values" (flattened float32), "label" (int64), "index" (digit row)
    data/<task>/meta.json               # image shape [C, H, W], classes, domain, sizes

Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir, atomic_file, write_json

SOURCE = "zoo://digits"

TASKS: tuple[str, ...] = ("rot90", "rot180", "hflip", "invert", "shuffle", "roll", "parity", "mod3")

# each task's domain style ("plain", the pre-training digits, is no task's)
DOMAINS: dict[str, str] = {
    "rot90": "hstripes",
    "rot180": "checker",
    "hflip": "frame",
    "invert": "negative",
    "shuffle": "faded",
    "roll": "vstripes",
    "parity": "gradient",
    "mod3": "dots",
}
STYLES: tuple[str, ...] = ("plain", *DOMAINS.values())

N_DIGITS = 1797
DIGIT_SIZE = 8  # scikit-learn's digits are 8x8; transforms and styles work at this size
_DIGITS = [str(i) for i in range(10)]


@dataclass(frozen=True)
class ZooSpec:
    """Everything that shapes the zoo; the defaults are the default zoo (about 2 minutes on one CPU core)."""

    n_tasks: int = 8  # the first n_tasks of TASKS
    # data
    max_samples: int | None = None  # None: all 1797 digits; fewer for tiny test zoos
    test_fraction: float = 0.25
    # model (CLIPVisionConfig)
    image_size: int = 8  # 8, or a multiple of 8 (nearest upsampling)
    patch_size: int = 2
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    projection_dim: int = 32
    # pre-training: plain digits (temporary digit head) + domain identification on unlabeled
    # images of every domain (temporary domain head)
    pretrain_epochs: int = 20
    pretrain_lr: float = 1e-3
    pretrain_weight_decay: float = 0.01
    pretrain_domain_weight: float = 1.0  # 0: plain digits only, no domain objective
    # fine-tuning: whole vision tower, frozen per-task head
    finetune_epochs: int = 15
    finetune_lr: float = 1e-3
    finetune_weight_decay: float = 0.0
    finetune_embed_lr_scale: float = 0.1  # lr multiplier of the patch/position/class embeddings
    batch_size: int = 64
    logit_scale: float = 20.0
    center_heads: bool = True
    threads: int = 1  # torch threads during the build

    def tasks(self) -> tuple[str, ...]:
        if not 1 <= self.n_tasks <= len(TASKS):
            raise MergeflowError(f"ZooSpec.n_tasks: {self.n_tasks} is outside [1, {len(TASKS)}]")
        return TASKS[: self.n_tasks]


# ----------------------------------------------------------------------------- data

def _block_permutation(n: int) -> torch.Tensor:
    """A fixed permutation of n blocks moving every block, the same for every seed."""
    g = torch.Generator().manual_seed(20250607)
    perm = torch.randperm(n, generator=g)
    while bool((perm == torch.arange(n)).any()):
        perm = torch.randperm(n, generator=g)
    return perm


def _shuffle_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n, c, h, w = x.shape
    gh, gw = h // block, w // block
    blocks = x.reshape(n, c, gh, block, gw, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * gw, block, block)
    blocks = blocks[:, :, _block_permutation(gh * gw)]
    return blocks.reshape(n, c, gh, gw, block, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def task_content(task: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Task ``task``'s content transform and label map of digits ``x`` [N, C, H, W] and labels ``y``.

    Returns (images, labels, class names); ``"plain"`` (the pre-training digits) is the identity."""
    hw = (-2, -1)
    if task in ("plain", "invert"):  # invert's change is its style (negative)
        return x, y, list(_DIGITS)
    if task == "rot90":
        return torch.rot90(x, 1, hw), y, list(_DIGITS)
    if task == "rot180":
        return torch.rot90(x, 2, hw), y, list(_DIGITS)
    if task == "hflip":
        return torch.flip(x, (-1,)), y, list(_DIGITS)
    if task == "shuffle":  # a fixed permutation of the blocks of a 4x4 grid (2x2 pixels on 8x8)
        return _shuffle_blocks(x, x.shape[-1] // 4), y, list(_DIGITS)
    if task == "roll":  # cyclic translation by half the height and a quarter of the width
        return torch.roll(x, (x.shape[-2] // 2, x.shape[-1] // 4), hw), y, list(_DIGITS)
    if task == "parity":  # transposed digit -> even / odd
        return x.transpose(-2, -1), y % 2, ["even", "odd"]
    if task == "mod3":  # upside-down digit -> value mod 3
        return torch.flip(x, (-2,)), y % 3, ["0 mod 3", "1 mod 3", "2 mod 3"]
    raise MergeflowError(f"zoo: unknown task {task!r} (known: {', '.join(TASKS)})")


def style_pattern(style: str, size: int) -> torch.Tensor:
    """The [size, size] background pattern p in [0, 1] of a pattern style (screen-blended by ``apply_style``)."""
    r = torch.arange(size).view(-1, 1).expand(size, size)
    c = torch.arange(size).view(1, -1).expand(size, size)
    if style == "hstripes":
        return 0.4 * (r % 2 == 0).float()
    if style == "vstripes":
        return 0.4 * (c % 2 == 0).float()
    if style == "checker":
        return 0.4 * ((r + c) % 2 == 0).float()
    if style == "frame":
        return ((r == 0) | (c == 0) | (r == size - 1) | (c == size - 1)).float()
    if style == "gradient":
        return 0.6 * r.float() / (size - 1)
    if style == "dots":
        return 0.6 * ((2 * r + c) % 5 == 0).float()
    raise MergeflowError(f"zoo: {style!r} is no pattern style (known: {', '.join(STYLES)})")


def apply_style(style: str, x: torch.Tensor) -> torch.Tensor:
    """Images ``x`` [N, C, H, W] in [0, 1] drawn in domain style ``style``, still in [0, 1]."""
    if style == "plain":
        return x
    if style == "negative":
        return 1.0 - x
    if style == "faded":
        return 0.3 + 0.4 * x
    p = style_pattern(style, x.shape[-1]).to(x)
    return x + p * (1.0 - x)  # screen blend: the stroke stays readable on the lighter background


def task_transform(task: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Task ``task``'s dataset made from digits ``x`` [N, C, H, W] in [0, 1] and labels ``y``:
    the content transform and label map, then the domain style. ``"plain"`` is the pre-training data.

    Returns (pixel_values, labels, class names)."""
    images, labels, classes = task_content(task, x, y)
    return apply_style("plain" if task == "plain" else DOMAINS[task], images), labels, classes


def split_indices(seed: int, spec: ZooSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test): sorted, disjoint row indices into scikit-learn's digits, fixed by the seed.

    One split for all tasks (and for the pre-training, which sees the train part only)."""
    if not 0 < spec.test_fraction < 1:
        raise MergeflowError(f"ZooSpec.test_fraction: {spec.test_fraction} is outside (0, 1)")
    g = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(N_DIGITS, generator=g)
    if spec.max_samples is not None:
        if spec.max_samples < 20:
            raise MergeflowError(f"ZooSpec.max_samples: {spec.max_samples} is below 20")
        order = order[: spec.max_samples]
    n_test = max(1, int(round(len(order) * spec.test_fraction)))
    if n_test >= len(order):
        raise MergeflowError(f"ZooSpec.test_fraction: {spec.test_fraction} leaves no training digits")
    return order[n_test:].sort().values, order[:n_test].sort().values


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as [N, 1, 8, 8] in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def _upsample(x: torch.Tensor, spec: ZooSpec) -> torch.Tensor:
    if spec.image_size == DIGIT_SIZE:
        return x
    if spec.image_size % DIGIT_SIZE or spec.image_size < DIGIT_SIZE:
        raise MergeflowError(f"ZooSpec.image_size: {spec.image_size} is not a multiple of 8")
    return torch.nn.functional.interpolate(x, size=(spec.image_size, spec.image_size), mode="nearest")


def load_digits_split(seed: int, spec: ZooSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the plain digits in [0, 1] as [N, 1, S, S], split by the seed."""
    x, y = _digits()
    train, test = split_indices(seed, spec)
    return _upsample(x[train], spec), y[train], _upsample(x[test], spec), y[test]


# ----------------------------------------------------------------------------- model

def make_config(spec: ZooSpec):
    from transformers import CLIPVisionConfig

    if spec.image_size % spec.patch_size or spec.hidden_size % spec.num_heads:
        raise MergeflowError(
            f"ZooSpec: image_size {spec.image_size} / patch_size {spec.patch_size} or "
            f"hidden_size {spec.hidden_size} / num_heads {spec.num_heads} don't divide"
        )
    config = CLIPVisionConfig(
        num_channels=1,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        projection_dim=spec.projection_dim,
        attention_dropout=0.0,
    )
    config.architectures = ["CLIPVisionModelWithProjection"]
    return config


def _new_model(spec: ZooSpec, seed: int):
    from transformers import CLIPVisionModelWithProjection

    config = make_config(spec)
    config._attn_implementation = "eager"  # deterministic, and the fastest on CPU at this size
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config)


def _make_head(means: torch.Tensor, center: bool) -> torch.Tensor:
    """L2-normalised rows: the class means of normalised embeddings, optionally centred first
    (minus their mean, so that the direction all classes share doesn't crowd them together)."""
    protos = torch.nn.functional.normalize(means, dim=-1)
    if center and len(protos) > 1:
        protos = protos - protos.mean(0, keepdim=True)
    return torch.nn.functional.normalize(protos, dim=-1)


def _embed(model, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    out = [model(pixel_values=x[i : i + batch_size]).image_embeds for i in range(0, len(x), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def _cosine_logits(emb: torch.Tensor, head: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(head, dim=-1).T


def _train(model, params, n: int, loss_of: Callable[[torch.Tensor], torch.Tensor], *, epochs, lr, weight_decay,
           batch_size, gen, embed_lr_scale=1.0) -> None:
    """AdamW with a short warm-up and cosine decay over ``epochs`` passes of ``n`` samples.

    Each step's sample indices (shuffled by ``gen``) go to ``loss_of``, which returns the loss."""
    embed = {id(p) for name, p in model.named_parameters() if ".embeddings." in name}
    groups = [
        {"params": [p for p in params if id(p) in embed], "lr": lr * embed_lr_scale},
        {"params": [p for p in params if id(p) not in embed], "lr": lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, foreach=True)
    total = max(1, epochs * math.ceil(n / batch_size))
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            loss = loss_of(perm[i : i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _accuracy(model, head: torch.Tensor, scale: float, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = (scale * _embed(model, x) @ head.T).argmax(-1)
    return float((pred == y).float().mean())


# ----------------------------------------------------------------------------- writers

def _save_checkpoint(model, path: Path) -> None:
    """Hugging Face layout (config.json + model.safetensors), written into a temp dir then renamed."""
    from safetensors.torch import save_file

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [model.__class__.__name__]
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        config.to_json_file(str(tmp / "config.json"))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def _save_head(path: Path, head: torch.Tensor, scale: float, task: str, classes: list[str]) -> None:
    """A safetensors file with the one tensor "weight" (float32) and the metadata
    logit_scale / task / classes, written by hand so that the header's key order, and hence
    the file, is the same on every build (safetensors' own writer orders metadata at random)."""
    import struct

    weight = head.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    data = weight.tobytes()
    meta = {"classes": json.dumps(classes), "logit_scale": repr(float(scale)), "task": task}
    header = {"__metadata__": meta,
              "weight": {"dtype": "F32", "shape": list(weight.shape), "data_offsets": [0, len(data)]}}
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _save_split(path: Path, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
    from datasets import Dataset, Features, List, Value
    from datasets.utils import logging as ds_logging

    features = Features({"pixel_values": List(Value("float32")), "label": Value("int64"), "index": Value("int64")})
    ds = Dataset.from_dict(
        {"pixel_values": x.reshape(len(x), -1).numpy(), "label": y.numpy(), "index": index.numpy()}, features=features
    )
    bars = ds_logging.is_progress_bar_enabled()
    if bars:
        ds_logging.disable_progress_bar()
    try:
        with atomic_file(path) as tmp:
            ds.to_parquet(str(tmp))
    finally:
        if bars:
            ds_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- build

def build_zoo(
    root: Path,
    seed: int = 0,
    spec: ZooSpec = ZooSpec(),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build the zoo under ``root`` (see the module docstring) and return its manifest.

    Deterministic: the same seed and spec give bitwise identical files on one machine. The
    global torch RNG state and thread count are saved and restored around the build."""
    root = Path(root)
    tasks = spec.tasks()
    if isinstance(spec.threads, bool) or not isinstance(spec.threads, int) or spec.threads < 1:
        raise MergeflowError(f"ZooSpec.threads: {spec.threads!r} is not a positive integer")
    if spec.pretrain_domain_weight < 0:
        raise MergeflowError(f"ZooSpec.pretrain_domain_weight: {spec.pretrain_domain_weight} is negative")
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _build(root, seed, spec, tasks, progress or (lambda msg: None))
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, seed: int, spec: ZooSpec, tasks: tuple[str, ...], say: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    ce = torch.nn.functional.cross_entropy
    x_all, y_all = _digits()
    i_tr, i_te = split_indices(seed, spec)
    x_tr, y_tr, x_te, y_te = x_all[i_tr], y_all[i_tr], x_all[i_te], y_all[i_te]
    # every dataset made once, at 8x8 then upsampled: (x_train, y_train, x_test, y_test, classes)
    sets = {}
    for task in ("plain", *tasks):
        xt, yt, classes = task_transform(task, x_tr, y_tr)
        xe, ye, _ = task_transform(task, x_te, y_te)
        sets[task] = (_upsample(xt, spec), yt, _upsample(xe, spec), ye, classes)
    domains = ["plain", *tasks]
    pool = torch.stack([sets[d][0] for d in domains])  # [domains, n_train, C, S, S]: unlabeled images
    n_dom, n_train = pool.shape[0], pool.shape[1]
    plain_x, plain_y = sets["plain"][0], sets["plain"][1]

    weight = spec.pretrain_domain_weight
    say(f"pretrain: {n_train} plain digits" + (f" + domain identification over {n_dom} domains" if weight > 0 else "")
        + f", {spec.pretrain_epochs} epochs")
    model = _new_model(spec, seed)
    torch.manual_seed(seed + 1)
    digit_head = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(10, spec.projection_dim), dim=-1))
    domain_head = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(n_dom, spec.projection_dim), dim=-1))
    domain_gen = torch.Generator().manual_seed(seed * 1000 + 2)

    def pretrain_loss(idx: torch.Tensor) -> torch.Tensor:
        if weight <= 0:
            emb = model(pixel_values=plain_x[idx]).image_embeds
            return ce(_cosine_logits(emb, digit_head, spec.logit_scale), plain_y[idx])
        dom = torch.randint(n_dom, (spec.batch_size,), generator=domain_gen)
        row = torch.randint(n_train, (spec.batch_size,), generator=domain_gen)
        emb = model(pixel_values=torch.cat([plain_x[idx], pool[dom, row]])).image_embeds  # one pass for both
        return (ce(_cosine_logits(emb[: len(idx)], digit_head, spec.logit_scale), plain_y[idx])
                + weight * ce(_cosine_logits(emb[len(idx):], domain_head, spec.logit_scale), dom))

    params = list(model.parameters()) + [digit_head] + ([domain_head] if weight > 0 else [])
    _train(model, params, n_train, pretrain_loss, epochs=spec.pretrain_epochs, lr=spec.pretrain_lr,
           weight_decay=spec.pretrain_weight_decay, batch_size=spec.batch_size,
           gen=torch.Generator().manual_seed(seed * 1000 + 1))
    with torch.no_grad():
        plain_acc = _accuracy(model, torch.nn.functional.normalize(digit_head, dim=-1), spec.logit_scale,
                              sets["plain"][2], sets["plain"][3])
        head = torch.nn.functional.normalize(domain_head, dim=-1)
        domain_acc = None if weight <= 0 else sum(
            _accuracy(model, head, spec.logit_scale, sets[d][2], torch.full_like(sets[d][3], i))
            for i, d in enumerate(domains)) / n_dom
    del digit_head, domain_head
    _save_checkpoint(model, root / "checkpoints" / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    metrics: dict[str, dict[str, float]] = {}
    classes_of: dict[str, list[str]] = {}
    for t_index, task in enumerate(tasks):
        xt, yt, xe, ye, classes = sets[task]
        classes_of[task] = classes
        data_dir = root / "data" / task
        _save_split(data_dir / "train.parquet", xt, yt, i_tr)
        _save_split(data_dir / "test.parquet", xe, ye, i_te)
        write_json(data_dir / "meta.json", {
            "task": task, "shape": list(xt.shape[1:]), "classes": classes, "domain": DOMAINS[task],
            "n_train": len(yt), "n_test": len(ye), "seed": seed,
        })

        # the frozen head: centred class means of the base embeddings on the train split
        model.load_state_dict(base_state)
        model.eval()
        with torch.no_grad():
            emb = _embed(model, xt)
            head = _make_head(torch.stack([emb[yt == c].mean(0) for c in range(len(classes))]), spec.center_heads)
        _save_head(root / "heads" / f"{task}.safetensors", head, spec.logit_scale, task, classes)
        base_acc = _accuracy(model, head, spec.logit_scale, xe, ye)

        say(f"expert {t_index + 1}/{len(tasks)}: {task} ({DOMAINS[task]}), {spec.finetune_epochs} epochs")
        torch.manual_seed(seed * 1000 + 100 + t_index)

        def finetune_loss(idx: torch.Tensor, xt=xt, yt=yt, head=head) -> torch.Tensor:
            return ce(_cosine_logits(model(pixel_values=xt[idx]).image_embeds, head, spec.logit_scale), yt[idx])

        _train(model, list(model.parameters()), len(yt), finetune_loss, epochs=spec.finetune_epochs,
               lr=spec.finetune_lr, weight_decay=spec.finetune_weight_decay, batch_size=spec.batch_size,
               gen=torch.Generator().manual_seed(seed * 1000 + 100 + t_index),
               embed_lr_scale=spec.finetune_embed_lr_scale)
        metrics[task] = {"base": base_acc, "expert": _accuracy(model, head, spec.logit_scale, xe, ye)}
        _save_checkpoint(model, root / "checkpoints" / task)

    say(f"zoo built in {time.perf_counter() - t_start:.1f}s")
    return {
        "source": SOURCE,
        "seed": seed,
        "spec": asdict(spec),
        "tasks": list(tasks),
        "base": "checkpoints/base",
        "experts": {t: f"checkpoints/{t}" for t in tasks},
        "heads": {t: f"heads/{t}.safetensors" for t in tasks},
        "data": {t: f"data/{t}" for t in tasks},
        "classes": classes_of,
        "domains": {t: DOMAINS[t] for t in tasks},
        "sizes": {"train": len(i_tr), "test": len(i_te)},
        "pretrain_accuracy": plain_acc,  # plain digits, test split, temporary digit head
        "pretrain_domain_accuracy": domain_acc,  # mean over domains, test split, temporary head; None: no objective
        "accuracy": metrics,  # test accuracy at build time: base tower + head, expert + head
    }
