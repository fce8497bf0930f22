"""Raw fine-tunes as merge inputs: every checkpoint's names mapped onto the body it shares.

A Hugging Face task model keeps its body under the architecture's ``base_model_prefix``
(``bert.``, ``roberta.``, ``deberta.``, ``vit.``) and its head outside it (``classifier.*``); a
bare encoder (``BertModel``) keeps the body at the top. :func:`parts` reads that from config.json
(``architectures``, looked up in transformers) and splits a checkpoint into body names (prefix
removed) and head names. Heads of classification-style architectures are never merged; causal
and masked LMs, bare models and files without a config are all body.

:class:`BodyView` serves a checkpoint under the base's body names: what the merge engine reads
and writes. Non-floating buffers a fine-tune lacks (legacy ``embeddings.position_ids``) come from
the base, which the engine copies anyway; base tensors no fine-tune has are kept from the base
when the base is of another architecture (a CLIPModel's text tower beside fine-tuned
CLIPVisionModel towers). Every other difference is a one-line error naming both sides' prefixes
and the first tensor that differs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mergeflow.errors import MergeflowError

# architectures whose head is task-specific (the rest of the model is the shared body)
HEAD_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForImageClassification",
    "ForMultipleChoice",
    "ForQuestionAnswering",
    "ForAudioClassification",
)
FAMILIES = ("auto", "none")


@dataclass(frozen=True)
class Parts:
    """One checkpoint's names: ``body`` maps a body name to the stored name; ``heads`` are stored
    names outside the body (a classification head), never merged."""

    path: Path
    arch: str | None
    prefix: str
    body: dict[str, str]
    heads: list[str] = field(default_factory=list)
    config: dict | None = None


def _config(ck) -> dict | None:
    cp = getattr(ck, "config_path", None)
    if cp is None:
        return None
    try:
        raw = json.loads(Path(cp).read_text())
    except (OSError, ValueError) as exc:
        raise MergeflowError(f"{cp}: not valid JSON ({exc})") from None
    return raw if isinstance(raw, dict) else None


@functools.lru_cache(maxsize=None)
def body_prefix(arch: str) -> str | None:
    """transformers' ``base_model_prefix`` of the architecture ``arch`` (None if unknown)."""
    import transformers

    cls = getattr(transformers, arch, None)
    prefix = getattr(cls, "base_model_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


def architecture(ck, family: str = "auto") -> tuple[str | None, dict | None]:
    """(config.json's first architecture, the config) of a checkpoint folder; (None, None) without one."""
    if family not in FAMILIES:
        raise MergeflowError(f"--family: {family!r} is not one of {', '.join(FAMILIES)}")
    config = _config(ck) if family == "auto" else None
    archs = (config or {}).get("architectures") or []
    return (archs[0] if archs and isinstance(archs[0], str) else None), config


def parts(ck, family: str = "auto") -> Parts:
    """Split ``ck``'s names into body and heads (``family`` ``none``: every name is body, as is).
    ``body`` maps each body tensor's canonical name (the prefix removed) to its stored name."""
    names = ck.names()
    arch, config = architecture(ck, family)
    prefix = body_prefix(arch) if arch else None
    if prefix is None or not any(n.startswith(prefix + ".") for n in names):
        return Parts(ck.path, arch, "", {n: n for n in names}, [], config)  # bare model: all body
    p = prefix + "."
    body = {n[len(p) :]: n for n in names if n.startswith(p)}
    rest = [n for n in names if not n.startswith(p)]
    if arch is not None and arch.endswith(HEAD_SUFFIXES):
        return Parts(ck.path, arch, p, body, rest, config)
    for n in rest:  # an LM head and the like: shared, merged
        body.setdefault(n, n)
    return Parts(ck.path, arch, p, body, [], config)


class BodyView:
    """``ck`` read under body names (``names`` fixed by the caller): the CheckpointReader the
    engine and the writer see. ``fallback`` serves the names ``ck`` lacks (the base's buffers)."""

    def __init__(self, ck, mapping: dict[str, str], names: Sequence[str], fallback=None, config_path=None):
        self.ck, self.mapping, self._names, self.fallback = ck, mapping, list(names), fallback
        self.path = ck.path
        self.config_path = config_path if config_path is not None else getattr(ck, "config_path", None)

    def _src(self, name: str):
        if name in self.mapping:
            return self.ck, self.mapping[name]
        if self.fallback is not None and name in self._names:
            return self.fallback._src(name) if isinstance(self.fallback, BodyView) else (self.fallback, name)
        raise MergeflowError(f"{self.path}: tensor {name} not in checkpoint")

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str, alloc=None) -> torch.Tensor:
        ck, key = self._src(name)
        return ck.get(key, alloc) if alloc is not None else ck.get(key)

    def items(self, names=None):
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        ck, key = self._src(name)
        return tuple(ck.shape(key))

    def tensor_dtype(self, name: str) -> torch.dtype:
        ck, key = self._src(name)
        return ck.tensor_dtype(key)

    def file_of(self, name: str) -> Path:
        ck, key = self._src(name)
        return ck.file_of(key)

    def dtype(self) -> torch.dtype:
        return self.ck.dtype()

    def close(self) -> None:
        self.ck.close()


def _side(p: Parts) -> str:
    return f"names under {p.prefix!r}" if p.prefix else "bare names"


@dataclass
class Aligned:
    """The base and every fine-tune under the base's body names, with what was left out."""

    base: BodyView
    models: list[BodyView]
    parts: list[Parts]  # the fine-tunes'
    base_parts: Parts
    kept: list[str]  # base body tensors no fine-tune has: written from the base
    needs_view: bool  # some name differs, a head or a base-only tensor: read through the views


def align(base_ck, model_cks: Sequence, labels: Sequence[str], family: str = "auto") -> Aligned:
    """Map the fine-tunes onto the base's body, kept under the base's own stored names (the output
    is laid out as the base is); one-line errors name both sides' conventions."""
    archs = [architecture(ck, family)[0] for ck in (base_ck, *model_cks)]
    same = all(set(ck.names()) == set(base_ck.names()) for ck in model_cks)
    if same and not any(a and a.endswith(HEAD_SUFFIXES) for a in archs):  # nothing to map: no transformers import
        bp = Parts(base_ck.path, archs[0], "", {n: n for n in base_ck.names()})
        mps = [Parts(ck.path, a, "", {n: n for n in ck.names()}) for ck, a in zip(model_cks, archs[1:])]
    else:
        bp = parts(base_ck, family)
        mps = [_nested(bp, parts(ck, family)) for ck in model_cks]
    canon = list(bp.body)  # canonical body names, in the base's order
    out = [bp.body[c] for c in canon]  # ... and the names the output keeps
    floating = {c for c in canon if base_ck.tensor_dtype(bp.body[c]).is_floating_point}
    have = [set(mp.body) for mp in mps]
    kept = [c for c in canon if c in floating and not any(c in h for h in have)]
    if floating and len(kept) == len(floating):
        mp = mps[0]
        raise MergeflowError(
            f"{labels[0]}: no body tensor in common with the base (the base has {_side(bp)}, e.g. {out[0]!r}; "
            f"the model has {_side(mp)}, e.g. {next(iter(mp.body.values()), '-')!r}): not a fine-tune of this base"
        )
    # base tensors no fine-tune has are kept only for a base of another architecture than the
    # fine-tunes' (a CLIPModel's text tower beside CLIPVisionModel experts): otherwise a file is short
    if kept and not (bp.arch and all(mp.arch and mp.arch != bp.arch for mp in mps)):
        raise MergeflowError(f"{labels[0]}: tensor {bp.body[kept[0]]} of the base is missing")
    for label, mp, h, ck in zip(labels, mps, have, model_cks):
        missing = [c for c in canon if c in floating and c not in h and c not in kept]
        if missing:
            raise MergeflowError(
                f"{label}: tensor {bp.body[missing[0]]} of the base's body is missing ({len(missing)} missing; "
                f"the base has {_side(bp)}, the model {_side(mp)})"
            )
        extra = [c for c in mp.body if c not in bp.body and ck.tensor_dtype(mp.body[c]).is_floating_point]
        if extra:
            hint = f"; the base carries a head ({bp.heads[0]}), the model does not" if bp.heads and not mp.heads else ""
            raise MergeflowError(
                f"{label}: tensor {mp.body[extra[0]]} is not in the base's body ({len(extra)} such; "
                f"the base has {_side(bp)}, the model {_side(mp)}{hint})"
            )
        for c in canon:
            if c in h and tuple(ck.shape(mp.body[c])) != tuple(base_ck.shape(bp.body[c])):
                raise MergeflowError(
                    f"{label}: tensor {mp.body[c]} has shape {list(ck.shape(mp.body[c]))}, "
                    f"the base's {bp.body[c]} has {list(base_ck.shape(bp.body[c]))}"
                )
    base = BodyView(base_ck, dict(zip(out, out)), out)
    models = [
        BodyView(ck, {bp.body[c]: mp.body[c] for c in canon if c in mp.body}, out, fallback=base)
        for ck, mp in zip(model_cks, mps)
    ]
    renamed = bool(bp.heads) or any(mp.heads or any(bp.body.get(c) != n for c, n in mp.body.items()) for mp in mps)
    return Aligned(base, models, mps, bp, [bp.body[c] for c in kept], renamed or bool(kept) or _lacking(bp, mps))


def _nested(bp: Parts, mp: Parts) -> Parts:
    """A fine-tune of one tower of the base (``CLIPVisionModel`` saved with bare names beside a
    ``CLIPModel`` base's ``vision_model.*``): its body names under the prefix that places most of
    them in the base's body. Unchanged when most of them are there already."""
    names = list(mp.body)
    if not names or sum(c in bp.body for c in names) * 2 > len(names):
        return mp
    counts: dict[str, int] = {}
    for probe in names[:8]:
        for b in bp.body:
            if b.endswith("." + probe):
                counts.setdefault(b[: -len(probe)], 0)
    for prefix in counts:
        counts[prefix] = sum(prefix + c in bp.body for c in names)
    best = max(counts, key=counts.__getitem__, default=None)
    if best is None or counts[best] * 2 <= len(names):
        return mp
    return Parts(mp.path, mp.arch, mp.prefix, {best + c: n for c, n in mp.body.items()}, mp.heads, mp.config)


def _lacking(bp: Parts, mps: Sequence[Parts]) -> bool:
    """Whether some fine-tune lacks a base body tensor (served from the base: a legacy buffer)."""
    return any(c not in mp.body for mp in mps for c in bp.body)


def head_labels(refs: Sequence[str]) -> list[str]:
    """A file-safe, unique label per model ref (its last path part; ``-2``, ``-3`` on repeats)."""
    import re

    out: list[str] = []
    for ref in refs:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref.rstrip("/").split("@")[0].rsplit("/", 1)[-1]).strip("._") or "model"
        label, k = stem, 2
        while label in out:
            label, k = f"{stem}-{k}", k + 1
        out.append(label)
    return out


def write_heads(folder: Path, al: Aligned, model_cks: Sequence, labels: Sequence[str]) -> list[str]:
    """``folder/heads/<label>.safetensors`` for every fine-tune with a head: its tensors as stored,
    its config.json (``id2label`` / ``label2id``) in the metadata. Returns the labels written."""
    from safetensors.torch import save_file

    written = []
    for i, (mp, ck, label) in enumerate(zip(al.parts, model_cks, labels)):
        if not mp.heads:
            continue
        (folder / "heads").mkdir(exist_ok=True)
        tensors = {n: ck.get(n).contiguous() for n in mp.heads}
        meta = {"task": label, "task_index": str(i), "architecture": mp.arch or "", "prefix": mp.prefix}
        meta["config"] = json.dumps(mp.config or {})
        save_file(tensors, str(folder / "heads" / f"{label}.safetensors"), metadata=meta)
        written.append(label)
    return written
