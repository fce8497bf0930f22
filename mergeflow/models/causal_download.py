"""The causal-LM family's download stage: the base and every task (full fine-tunes or LoRA
adapters) checked against each other and streamed tensor by tensor into ``checkpoints/``, and the
evaluation text into ``data/`` (see docs/family-causal.md for the layout of both modes).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.causal_build import empty_model, load_config, model_names
from mergeflow.models.causal_data import load_tokenizer, prepare_blocks
from mergeflow.models.causal_lora import ADAPTER_CONFIG, Adapter, check_adapters, is_adapter
from mergeflow.models.family import FROZEN, Sources

if TYPE_CHECKING:
    from mergeflow.io.checkpoint_like import ShardedLayout

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointView:
    """A checkpoint seen under other names or restricted to some tensors (``names``: output name
    -> name in ``ck``), for :class:`CheckpointWriter` to lay out its output like ``ck``."""

    def __init__(self, ck: ShardedLayout, names: dict[str, str]):
        self.ck, self.map, self.path = ck, names, ck.path

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ck.shape(self.map[name])

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self.ck.tensor_dtype(self.map[name])

    def file_of(self, name: str) -> Path:
        return self.ck.file_of(self.map[name])


def copy_files(src: Path, dst: Path, names) -> None:
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


@overload
def _int_option(value: Any, key: str, allow_none: Literal[False] = False) -> int: ...
@overload
def _int_option(value: Any, key: str, allow_none: bool) -> int | None: ...
def _int_option(value: Any, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeflowError(
            f"params: download.options.{key}: expected a positive integer{' or null' if allow_none else ''}, got {value!r}"
        )
    return value


def prepare(sources: Sources, out: Path, log) -> dict:
    """``CausalLM.prepare``: write ``out/checkpoints`` and ``out/data``; the facts for sources.json."""
    from mergeflow.io.checkpoint import Checkpoint

    opts = sources.options
    block = _int_option(opts["block_size"], "block_size")
    max_blocks = _int_option(opts["max_blocks"], "max_blocks", allow_none=True)
    pool = _int_option(opts["query_pool"], "query_pool")
    base_dir = sources.base.path
    if is_adapter(base_dir):
        raise MergeflowError(
            f"download.base: {sources.base.ref} is a LoRA adapter ({ADAPTER_CONFIG}); "
            f"the base must be the full model the adapters were trained on"
        )
    kinds = {t: is_adapter(ts.model.path) for t, ts in sources.tasks.items()}
    if len(set(kinds.values())) > 1:
        a = next(t for t, k in kinds.items() if k)
        f = next(t for t, k in kinds.items() if not k)
        raise MergeflowError(
            f"download.tasks: {a} is a LoRA adapter ({sources.tasks[a].model.ref}) but {f} is a full "
            f"model ({sources.tasks[f].model.ref}); give all adapters or all full models"
        )
    lora = all(kinds.values())
    config = load_config(base_dir)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and block > limit:
        raise MergeflowError(
            f"params: download.options.block_size: {block} is longer than the base's max_position_embeddings {limit}"
        )
    adapters = {t: Adapter.read(ts.model.path) for t, ts in sources.tasks.items()} if lora else {}
    base = Checkpoint(base_dir)
    keep = mergeable(base, config, base_dir, log)
    tasks_ck = {}
    if lora:
        shapes = check_adapters(adapters, config)
    else:
        for t, ts in sources.tasks.items():
            tasks_ck[t] = check_task(Checkpoint(ts.model.path), ts.model.path, base, keep)

    # the evaluation text first: a missing column fails before gigabytes are copied
    tokenizer = load_tokenizer(base_dir)
    facts: dict[str, Any] = {"metrics": {}, "lora": lora, "block_size": block, "blocks": {}}
    for t, ts in sources.tasks.items():
        facts["blocks"][t] = prepare_blocks(ts, tokenizer, block, max_blocks, pool, out / "data" / t, log)
        facts["metrics"][t] = "perplexity"

    from mergeflow.io.writer import CheckpointWriter

    ckpts = out / "checkpoints"
    with CheckpointWriter(ckpts / (FROZEN if lora else "base"), like=CheckpointView(base, keep)) as w:
        for name in keep:
            w.write(name, base.get(name))
        copy_files(base_dir, w.tmp, TOKENIZER_FILES)
    shards = len({base.file_of(n) for n in keep})
    log(
        f"download: {'backbone (frozen)' if lora else 'base'}: {len(keep)} tensors"
        + (f" in {shards} shards" if shards > 1 else "")
    )
    if lora:
        first = next(iter(adapters.values()))
        first_ck = Checkpoint(first.weights)
        like = CheckpointView(first_ck, {n: first.names[n] for n in shapes})
        with CheckpointWriter(ckpts / "base", like=like) as w:
            for n in shapes:
                w.write(n, torch.zeros(like.shape(n), dtype=like.tensor_dtype(n)))
            shutil.copyfile(first.folder / ADAPTER_CONFIG, w.tmp / ADAPTER_CONFIG)
        for t, ad in adapters.items():
            ck = Checkpoint(ad.weights)
            with CheckpointWriter(ckpts / t, like=like) as w:
                for n in shapes:
                    w.write(n, ck.get(ad.names[n]))
                shutil.copyfile(ad.folder / ADAPTER_CONFIG, w.tmp / ADAPTER_CONFIG)
            log(f"download: {t}: LoRA adapter, {len(shapes)} factors, {sum(math.prod(s) for s in shapes.values()):,} parameters")
        facts |= {
            "lora_r": first.config.get("r"),
            "lora_alpha": first.config.get("lora_alpha"),
            "target_modules": first.shared()["target_modules"],
        }
    else:
        for t, ck in tasks_ck.items():
            cast = sorted(
                {str(ck.tensor_dtype(n)).removeprefix("torch.") for n in keep if ck.tensor_dtype(n) != base.tensor_dtype(n)}
            )
            with CheckpointWriter(ckpts / t, like=CheckpointView(base, keep)) as w:
                for name in keep:
                    w.write(name, ck.get(name))
                copy_files(sources.tasks[t].model.path, w.tmp, ("config.json", "generation_config.json"))
            log(f"download: {t}: {len(keep)} tensors" + (f" ({', '.join(cast)} cast to the base's dtype)" if cast else ""))
    return facts


def mergeable(base, config, where: Path, log) -> dict[str, str]:
    """The base's tensors the model holds (identity name map); a missing one is an error, one
    the model does not know (a tied copy, an old rotary buffer) is left out."""
    names, aliases = model_names(empty_model(config, meta_buffers=True))
    have = set(base.names())
    if missing := [n for n in names if n not in have]:
        raise MergeflowError(
            f"{where}: tensor {missing[0]} missing ({len(missing)} missing): not a checkpoint of "
            f"its config's {type(config).__name__.removesuffix('Config')} architecture"
        )
    if extra := [n for n in base.names() if n not in names]:
        log(
            f"download: {where}: {len(extra)} tensors the model does not hold are left out ({extra[0]}"
            + (", tied to " + aliases[extra[0]] if extra[0] in aliases else "")
            + ")"
        )
    return {n: n for n in names}


def check_task(ck, where: Path, base, keep: dict[str, str]):
    """A full fine-tune: the base's tensors with the base's shapes (headers only, no data read)."""
    have = set(ck.names())
    for name in keep:
        if name not in have:
            raise MergeflowError(f"{where}: tensor {name} of the base is missing")
        if ck.shape(name) != base.shape(name):
            raise MergeflowError(
                f"{ck.file_of(name)}: tensor {name} has shape {list(ck.shape(name))}, the base has {list(base.shape(name))}"
            )
    if "lm_head.weight" in have and "lm_head.weight" not in keep:
        cfg = load_config(where) if (Path(where) / "config.json").exists() else None
        if cfg is not None and not getattr(cfg, "tie_word_embeddings", True):
            raise MergeflowError(
                f"{ck.file_of('lm_head.weight')}: tensor lm_head.weight is trained apart from the "
                f"embeddings, but the base ties them (tie_word_embeddings)"
            )
    return ck
