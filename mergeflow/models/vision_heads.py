"""CLIP-vision heads: per task a frozen ``weight`` [n_classes, projection_dim] with a ``logit_scale``,
logits = logit_scale * normalize(image_embeds) @ weight.T. CLIP's zero-shot heads built at download
(class names x prompt templates through the base's text tower), head files written and read, and
top-1 accuracy of a model with one.

transformers is imported lazily (importing it costs seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.vision_build import image_embeddings

# Zero-shot prompt templates of the 8-task suite, as in CLIP's and the task-vectors papers' code.
TEMPLATES: dict[str, list[str]] = {
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "stanford_cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "resisc45": [
        f"{kind} {view} of {art}{{}}."
        for art in ("", "a ", "the ")
        for kind, view in (
            ("satellite", "imagery"),
            ("aerial", "imagery"),
            ("satellite", "photo"),
            ("aerial", "photo"),
            ("satellite", "view"),
            ("aerial", "view"),
        )
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "mnist": ['a photo of the number: "{}".'],
    "dtd": [f"a photo of {art} {{}} {what}." for art in ("a", "the") for what in ("texture", "pattern", "thing", "object")],
}
TEMPLATES["cars"] = TEMPLATES["stanford_cars"]
DEFAULT_TEMPLATES = ["a photo of a {}."]


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


@torch.no_grad()
def accuracy(
    model, head: torch.Tensor, logit_scale: float, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy in [0, 1] of logits = logit_scale * image_embeddings @ head.T."""
    if len(labels) == 0:
        raise MergeflowError("accuracy: empty evaluation set")
    emb = image_embeddings(model, pixel_values, batch_size)
    head = head.to(device=emb.device, dtype=torch.float32)
    pred = (logit_scale * emb @ head.T).argmax(-1).cpu()
    return float((pred == labels.cpu()).float().mean())


def text_tower(base_dir: Path, base_ck):
    """(CLIPTextModelWithProjection, tokenizer, logit_scale) of the base CLIP checkpoint."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

    raw = json.loads((Path(base_dir) / "config.json").read_text())
    if raw.get("model_type") != "clip":
        raise MergeflowError(
            f"{base_dir}/config.json: the base must be a full CLIP model (text tower for zero-shot heads), "
            f"got model_type {raw.get('model_type')!r}"
        )
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


def save_head(path: Path, weight: torch.Tensor, scale: float, task: str, classes: list[str]) -> None:
    from mergeflow.io.checkpoint import save_tensors

    save_tensors(
        path,
        {"weight": weight.to(torch.float32)},
        metadata={"logit_scale": repr(float(scale)), "task": task, "classes": json.dumps(classes)},
    )
