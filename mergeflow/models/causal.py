"""Model-family adapter for causal language models and their LoRA adapters, scored by perplexity.

Two modes, chosen at download from what the task refs are:

* **Full models** (each task a fine-tune, or continued training, of the base): every tensor of
  the checkpoint is mergeable. ``checkpoints/base`` and ``checkpoints/<task>`` are streamed
  tensor by tensor (:class:`~mergeflow.io.checkpoint.Checkpoint` into
  :class:`~mergeflow.io.writer.CheckpointWriter`), laid out like the base's safetensors shards,
  so peak memory is one tensor whatever the model's size (a base sharded as ``pytorch_model-*.bin``
  comes out as one ``model.safetensors``, still written tensor by tensor). A tied ``lm_head``
  (absent from the file) stays absent: the model ties it again when built.
* **LoRA** (each task a PEFT adapter folder, ``adapter_config.json`` + ``adapter_model.safetensors``,
  over the base): the mergeable tensors are the adapter factors ``lora_A`` / ``lora_B``, named as
  PEFT saves them (``base_model.model.<module>.lora_A.weight``). ``checkpoints/base`` holds zeros of
  the same names and shapes, so a task vector is the factors themselves (T-Switch binarises each
  factor, as the paper does for LoRA); the backbone goes to ``checkpoints/_frozen`` and is never
  merged. A model is the backbone with a PEFT LoRA adapter injected (scaling ``lora_alpha / r``)
  whose factors are the given tensors.

Evaluation data: each task's text column is tokenised with the base's tokenizer, the texts
concatenated with EOS between them and cut into blocks of ``block_size`` tokens (the ragged tail
dropped); ``data/<task>/test.safetensors`` holds the evaluation blocks, ``train.safetensors`` a
few train blocks for Auto-Switch's query set. ``predict`` gives per block (sum of token NLL,
predicted tokens); ``score`` is 1/perplexity.

transformers, peft and datasets are imported lazily (importing them costs seconds).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import FROZEN, Family, Sources, TaskSources

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
LORA_PREFIX = "base_model.model."
# what every adapter must share with the first (the factors of one layout), and what is refused
SHARED_LORA_KEYS = ("target_modules", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                    "layers_to_transform", "layers_pattern", "exclude_modules", "lora_bias", "fan_in_fan_out")
LOGITS_BUDGET = 1 << 27  # logits elements per forward pass (batch x block x vocab): 512 MB in float32


# --- evaluation data ---------------------------------------------------------------------

@dataclass
class Blocks:
    """A task's split: token blocks [n, block_size] (int64)."""

    input_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenise_blocks(tokenizer, texts, block_size: int, max_blocks: int | None, where: str) -> torch.Tensor:
    """[n, block_size] int64: the texts tokenised (no special tokens), concatenated with EOS after
    each, cut into blocks; the ragged tail is dropped; at most ``max_blocks`` blocks (tokenising
    stops once they are filled). ``texts`` yields lists of strings (None and "" are skipped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MergeflowError(f"{where}: the base's tokenizer has no EOS token to join texts with")
    need = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    for batch in texts:
        for t in batch:
            if t is not None and not isinstance(t, str):
                raise MergeflowError(f"{where}: holds a {type(t).__name__}, not text")
        batch = [t for t in batch if t]
        if batch:
            for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                ids.extend(row)
                ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.int64).reshape(n, block_size)


def _text_batches(ds, column: str, batch: int = 1000):
    for start in range(0, len(ds), batch):
        yield ds[start:start + batch][column]


def _save_blocks(path: Path, blocks: torch.Tensor, metadata: dict[str, str]) -> None:
    from mergeflow.io.checkpoint import save_tensors

    dtype = torch.int32 if blocks.numel() == 0 or int(blocks.max()) < 2**31 else torch.int64
    save_tensors(path, {"input_ids": blocks.to(dtype)}, metadata=metadata)


def load_blocks(path: Path, limit: int | None = None) -> Blocks:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise MergeflowError(f"{path}: split not found (run the download stage)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            if "input_ids" not in fh.keys():
                raise MergeflowError(f"{path}: no tensor 'input_ids'")
            ids = fh.get_slice("input_ids")
            n = ids.get_shape()[0]
            ids = ids[: n if not limit else min(limit, n)]
    except SafetensorError as exc:
        raise MergeflowError(f"{path}: not a safetensors file ({exc})") from None
    return Blocks(ids.to(torch.int64))


# --- building models ---------------------------------------------------------------------

def load_config(folder: Path):
    """The transformers config of a causal-LM checkpoint folder; a one-line error otherwise."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    if not path.exists():
        raise MergeflowError(f"{path}: config.json not found")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise MergeflowError(f"{path}: not a usable transformers config ({' '.join(str(exc).split())[:200]})") from None
    return config


def _empty_model(config, meta_buffers: bool = False):
    """``AutoModelForCausalLM`` of ``config`` with its parameters on the meta device; its
    non-persistent buffers (rotary frequencies) computed for real on the CPU unless ``meta_buffers``.

    Built under ``torch.device("meta")``, which is local to the calling thread: accelerate's
    ``init_empty_weights`` patches ``nn.Module`` for every thread, and two stage units building
    at once would leave it patched for good."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise MergeflowError(f"model type {config.model_type!r}: no causal LM in transformers "
                             f"({' '.join(str(exc).split())[:160]})") from None
    if not meta_buffers:
        _materialise_buffers(model)
    return model


def _materialise_buffers(model) -> None:
    """Give the meta buffers their values on the CPU the way transformers does when it loads a
    checkpoint: a fresh tensor, then the model's own ``_init_weights`` for the module holding it.
    A buffer that stays unset is a one-line MergeflowError naming it."""
    for mod_name, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        for n in metas:
            old = module._buffers[n]
            fresh = torch.empty_like(old, device="cpu")
            if fresh.is_floating_point():
                fresh.fill_(float("nan"))
            module._buffers[n] = fresh
        model._init_weights(module)
        for n in metas:
            b = module._buffers[n]
            if not b.is_floating_point() or torch.isnan(b).any():
                raise MergeflowError(f"build: buffer {mod_name}.{n} has no value (transformers does not initialise it)")


def model_names(model) -> tuple[list[str], dict[str, str]]:
    """(the state-dict names a checkpoint holds, {tied name: the name it is tied to}): a tied
    ``lm_head.weight`` is the embedding itself and is not stored."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return [n for n in model.state_dict() if n not in aliases], aliases


def build_causal(config, state_dict: dict[str, torch.Tensor], device="cpu") -> torch.nn.Module:
    """``AutoModelForCausalLM`` in eval mode holding exactly ``state_dict`` (tied weights tied again).

    Strict: a missing or unexpected tensor, or a shape that does not fit the config, is a one-line
    MergeflowError naming the tensor. Tensors keep their dtype and, on their own device, are used
    as they are: the model shares memory with ``state_dict``."""
    model = _empty_model(config)
    names, aliases = model_names(model)
    expected = model.state_dict()
    missing = [n for n in names if n not in state_dict]
    unexpected = sorted(n for n in state_dict if n not in expected or n in aliases)
    if missing:
        raise MergeflowError(f"build: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
    if unexpected:
        raise MergeflowError(f"build: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected)")
    for name in names:
        if tuple(state_dict[name].shape) != tuple(expected[name].shape):
            raise MergeflowError(f"build: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                                 f"the config wants {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=False, assign=True)
    for name, source in aliases.items():  # re-tie: assignment replaced the source parameter only
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    if meta := [n for n, p in model.named_parameters() if p.is_meta]:  # pragma: no cover - guarded above
        raise MergeflowError(f"build: tensor {meta[0]} has no value")
    model.requires_grad_(False)
    return model.to(device).eval()  # buffers to the device; parameters are there already


def _decoder(model):
    """The transformer body (last hidden states) of a causal LM, inside a PEFT wrapper too."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_decoder()


# --- LoRA ----------------------------------------------------------------------------------

def is_adapter(folder: Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / ADAPTER_CONFIG).exists()


def lora_name(name: str) -> str:
    """A LoRA tensor's name as PEFT saves it: ``base_model.model.<module>.lora_A.weight`` (the
    adapter name that live parameters carry, ``.lora_A.default.weight``, taken out)."""
    name = re.sub(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$", r".\1.\2", name)
    name = re.sub(r"\.(lora_embedding_[AB])\.[^.]+$", r".\1", name)
    return name if name.startswith(LORA_PREFIX) else LORA_PREFIX + name


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: its config (dict), weights file and normalised names."""

    folder: Path
    config: dict
    weights: Path
    names: dict[str, str]  # normalised name -> name in the file

    @classmethod
    def read(cls, folder: Path) -> "Adapter":
        from mergeflow.io.checkpoint import Checkpoint, member_of

        folder = Path(folder)
        cfg_path = member_of(folder, ADAPTER_CONFIG)
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise MergeflowError(f"{cfg_path}: not valid JSON ({' '.join(str(exc).split())[:160]})") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            kind = config.get("peft_type") if isinstance(config, dict) else None
            raise MergeflowError(f"{cfg_path}: peft_type {kind!r}, only LoRA adapters (LORA) are supported")
        if config.get("use_dora"):
            raise MergeflowError(f"{cfg_path}: use_dora: DoRA adapters are not supported (their magnitudes are no delta over zero)")
        if config.get("modules_to_save"):
            raise MergeflowError(f"{cfg_path}: modules_to_save {config['modules_to_save']}: fully trained modules beside "
                                 f"the factors are not supported")
        if config.get("bias", "none") != "none":
            raise MergeflowError(f"{cfg_path}: bias {config['bias']!r}: trained base biases are not supported (bias: none)")
        weights = next((member_of(folder, f) for f in ADAPTER_WEIGHTS if (folder / f).exists()), None)
        if weights is None:
            raise MergeflowError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
        names: dict[str, str] = {}
        for n in Checkpoint(weights).names():
            norm = lora_name(n)
            if norm in names:
                raise MergeflowError(f"{weights}: tensors {names[norm]} and {n} are the same factor")
            names[norm] = n
        return cls(folder, config, weights, names)

    def shared(self) -> dict:
        out = {}
        for key in SHARED_LORA_KEYS:
            v = self.config.get(key)
            out[key] = sorted(v) if isinstance(v, list) else v
        return out

    def lora_config(self):
        return lora_config(self.folder)


def lora_config(folder: Path):
    """PEFT's ``LoraConfig`` of ``folder/adapter_config.json``, for inference."""
    from peft import LoraConfig

    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - peft raises several kinds
        raise MergeflowError(f"{Path(folder) / ADAPTER_CONFIG}: not a LoRA config peft can read "
                             f"({' '.join(str(exc).split())[:160]})") from None
    cfg.inference_mode = True
    return cfg


def _inject(model, lora_config):
    """A PEFT model over ``model`` (changed in place) with a fresh LoRA adapter, on the meta device
    where ``model`` is. Not ``low_cpu_mem_usage``: PEFT then patches ``nn.Module`` for every thread
    (see :func:`_empty_model`); the adapter's factors are small enough to allocate."""
    from peft import get_peft_model

    first = next(model.parameters(), None)
    with torch.device("meta") if first is not None and first.is_meta else contextlib.nullcontext():
        return get_peft_model(model, copy.deepcopy(lora_config))


def lora_shapes(backbone_config, lora_config, where: Path) -> dict[str, tuple[int, ...]]:
    """The adapter factors PEFT makes for this config over the backbone: normalised name -> shape."""
    model = _empty_model(backbone_config, meta_buffers=True)
    try:
        peft_model = _inject(model, lora_config)
    except ValueError as exc:
        raise MergeflowError(f"{where}: does not fit the base model ({' '.join(str(exc).split())[:200]})") from None
    return {lora_name(n): tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n}


# --- the family ----------------------------------------------------------------------------

class _View:
    """A checkpoint seen under other names or restricted to some tensors (``names``: output name
    -> name in ``ck``), for :class:`CheckpointWriter` to lay out its output like ``ck``."""

    def __init__(self, ck, names: dict[str, str]):
        self.ck, self.map, self.path = ck, names, ck.path

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name):
        return self.ck.shape(self.map[name])

    def tensor_dtype(self, name):
        return self.ck.tensor_dtype(self.map[name])

    def file_of(self, name):
        return self.ck.file_of(self.map[name])


def _copy_files(src: Path, dst: Path, names) -> None:
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def _int_option(value, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeflowError(f"params: download.options.{key}: expected a positive integer{' or null' if allow_none else ''}, "
                             f"got {value!r}")
    return value


class CausalLM(Family):
    """Causal LMs (``AutoModelForCausalLM``: Llama, Qwen2, Mistral, Gemma, ...) and their LoRA
    adapters, evaluated by perplexity on a text dataset per task."""

    name = "causal_lm"
    options = {
        "block_size": 512,  # tokens per evaluation block
        "max_blocks": 1000,  # evaluation blocks kept per task (null: the whole split)
        "query_pool": 200,  # train blocks kept per task for Auto-Switch's query set
    }
    task_options = {
        "split": "test",  # evaluation split
        "train_split": "train",  # Auto-Switch's query blocks (the evaluation split when missing)
        "subset": None,  # dataset config name
        "text_column": "text",
    }

    # --- download ---------------------------------------------------------------------

    @classmethod
    def prepare(cls, sources: Sources, out: Path, log) -> dict:
        from mergeflow.io.checkpoint import Checkpoint

        opts = sources.options
        block = _int_option(opts["block_size"], "block_size")
        max_blocks = _int_option(opts["max_blocks"], "max_blocks", allow_none=True)
        pool = _int_option(opts["query_pool"], "query_pool")
        base_dir = sources.base.path
        if is_adapter(base_dir):
            raise MergeflowError(f"download.base: {sources.base.ref} is a LoRA adapter ({ADAPTER_CONFIG}); "
                                 f"the base must be the full model the adapters were trained on")
        kinds = {t: is_adapter(ts.model.path) for t, ts in sources.tasks.items()}
        if len(set(kinds.values())) > 1:
            a = next(t for t, k in kinds.items() if k)
            f = next(t for t, k in kinds.items() if not k)
            raise MergeflowError(f"download.tasks: {a} is a LoRA adapter ({sources.tasks[a].model.ref}) but {f} is a full "
                                 f"model ({sources.tasks[f].model.ref}); give all adapters or all full models")
        lora = all(kinds.values())
        config = load_config(base_dir)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and block > limit:
            raise MergeflowError(f"params: download.options.block_size: {block} is longer than the base's "
                                 f"max_position_embeddings {limit}")
        adapters = {t: Adapter.read(ts.model.path) for t, ts in sources.tasks.items()} if lora else {}
        base = Checkpoint(base_dir)
        keep = cls._mergeable(base, config, base_dir, log)
        tasks_ck = {}
        if lora:
            shapes = cls._check_adapters(adapters, config)
        else:
            for t, ts in sources.tasks.items():
                tasks_ck[t] = cls._check_task(Checkpoint(ts.model.path), ts.model.path, base, keep)

        # the evaluation text first: a missing column fails before gigabytes are copied
        tokenizer = _tokenizer(base_dir)
        facts: dict[str, Any] = {"metrics": {}, "lora": lora, "block_size": block, "blocks": {}}
        for t, ts in sources.tasks.items():
            facts["blocks"][t] = cls._prepare_data(ts, tokenizer, block, max_blocks, pool, out / "data" / t, log)
            facts["metrics"][t] = "perplexity"

        from mergeflow.io.writer import CheckpointWriter

        ckpts = out / "checkpoints"
        with CheckpointWriter(ckpts / (FROZEN if lora else "base"), like=_View(base, keep)) as w:
            for name in keep:
                w.write(name, base.get(name))
            _copy_files(base_dir, w.tmp, TOKENIZER_FILES)
        shards = len({base.file_of(n) for n in keep})
        log(f"download: {'backbone (frozen)' if lora else 'base'}: {len(keep)} tensors" + (f" in {shards} shards" if shards > 1 else ""))
        if lora:
            first = next(iter(adapters.values()))
            first_ck = Checkpoint(first.weights)
            like = _View(first_ck, {n: first.names[n] for n in shapes})
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
                log(f"download: {t}: LoRA adapter, {len(shapes)} factors, "
                    f"{sum(math.prod(s) for s in shapes.values()):,} parameters")
            facts |= {"lora_r": first.config.get("r"), "lora_alpha": first.config.get("lora_alpha"),
                      "target_modules": first.shared()["target_modules"]}
        else:
            for t, ck in tasks_ck.items():
                cast = sorted({str(ck.tensor_dtype(n)).removeprefix("torch.") for n in keep if ck.tensor_dtype(n) != base.tensor_dtype(n)})
                with CheckpointWriter(ckpts / t, like=_View(base, keep)) as w:
                    for name in keep:
                        w.write(name, ck.get(name))
                    _copy_files(sources.tasks[t].model.path, w.tmp, ("config.json", "generation_config.json"))
                log(f"download: {t}: {len(keep)} tensors" + (f" ({', '.join(cast)} cast to the base's dtype)" if cast else ""))
        return facts

    @staticmethod
    def _mergeable(base, config, where: Path, log) -> dict[str, str]:
        """The base's tensors the model holds (identity name map); a missing one is an error, one
        the model does not know (a tied copy, an old rotary buffer) is left out."""
        names, aliases = model_names(_empty_model(config, meta_buffers=True))
        have = set(base.names())
        if missing := [n for n in names if n not in have]:
            raise MergeflowError(f"{where}: tensor {missing[0]} missing ({len(missing)} missing): not a checkpoint of "
                                 f"its config's {type(config).__name__.removesuffix('Config')} architecture")
        if extra := [n for n in base.names() if n not in names]:
            log(f"download: {where}: {len(extra)} tensors the model does not hold are left out ({extra[0]}"
                + (", tied to " + aliases[extra[0]] if extra[0] in aliases else "") + ")")
        return {n: n for n in names}

    @staticmethod
    def _check_task(ck, where: Path, base, keep: dict[str, str]):
        """A full fine-tune: the base's tensors with the base's shapes (headers only, no data read)."""
        have = set(ck.names())
        for name in keep:
            if name not in have:
                raise MergeflowError(f"{where}: tensor {name} of the base is missing")
            if ck.shape(name) != base.shape(name):
                raise MergeflowError(f"{ck.file_of(name)}: tensor {name} has shape {list(ck.shape(name))}, "
                                     f"the base has {list(base.shape(name))}")
        if "lm_head.weight" in have and "lm_head.weight" not in keep:
            cfg = load_config(where) if (Path(where) / "config.json").exists() else None
            if cfg is not None and not getattr(cfg, "tie_word_embeddings", True):
                raise MergeflowError(f"{ck.file_of('lm_head.weight')}: tensor lm_head.weight is trained apart from the "
                                     f"embeddings, but the base ties them (tie_word_embeddings)")
        return ck

    @staticmethod
    def _check_adapters(adapters: dict[str, Adapter], backbone_config) -> dict[str, tuple[int, ...]]:
        """Every adapter: the first one's target modules, r and lora_alpha, and exactly the factors
        PEFT makes over the backbone for that config. Returns their names and shapes."""
        from mergeflow.io.checkpoint import Checkpoint

        tasks = list(adapters)
        first = adapters[tasks[0]]
        ref = first.shared()
        for t in tasks[1:]:
            mine = adapters[t].shared()
            for key in SHARED_LORA_KEYS:
                if mine[key] != ref[key]:
                    raise MergeflowError(f"{adapters[t].folder / ADAPTER_CONFIG}: {key} {mine[key]!r} differs from "
                                         f"{ref[key]!r} of {first.folder / ADAPTER_CONFIG} (adapters must share "
                                         f"target modules, r and lora_alpha)")
        shapes = lora_shapes(backbone_config, first.lora_config(), first.folder / ADAPTER_CONFIG)
        for t in tasks:
            ad = adapters[t]
            ck = Checkpoint(ad.weights)
            if missing := [n for n in shapes if n not in ad.names]:
                raise MergeflowError(f"{ad.weights}: tensor {missing[0]} missing ({len(missing)} missing) for its "
                                     f"target modules over the base")
            if extra := [n for n in ad.names if n not in shapes]:
                raise MergeflowError(f"{ad.weights}: tensor {ad.names[extra[0]]} is no LoRA factor of its config over the base")
            for n, shape in shapes.items():
                if tuple(ck.shape(ad.names[n])) != shape:
                    raise MergeflowError(f"{ad.weights}: tensor {ad.names[n]} has shape {list(ck.shape(ad.names[n]))}, "
                                         f"r and the base want {list(shape)}")
        return shapes

    @staticmethod
    def _prepare_data(ts: TaskSources, tokenizer, block: int, max_blocks: int | None, pool: int, folder: Path, log) -> dict:
        from mergeflow.models.data import load_split

        if ts.dataset is None:
            raise MergeflowError(f"download.tasks.{ts.name}.dataset: required for family causal_lm (a text dataset)")
        o = ts.options
        col = o["text_column"]
        where = f"{ts.dataset.ref}" + (f" ({o['subset']})" if o["subset"] else "")
        test_ds = load_split(ts.dataset, o["split"], o["subset"], [col])
        test = tokenise_blocks(tokenizer, _text_batches(test_ds, col), block, max_blocks, f"{where} column {col!r}")
        if len(test) == 0:
            raise MergeflowError(f"{where}: split {o['split']!r} holds less than one block of {block} tokens")
        train, train_from = None, o["train_split"]
        if train_from and train_from != o["split"]:
            try:
                train_ds = load_split(ts.dataset, train_from, o["subset"], [col])
            except MergeflowError as exc:
                if f"no split {train_from!r}" not in str(exc):
                    raise
            else:
                train = tokenise_blocks(tokenizer, _text_batches(train_ds, col), block, pool, f"{where} column {col!r}")
                if len(train) == 0:
                    train = None
        if train is None:
            log(f"download: {ts.name}: no usable train split {train_from!r} in {where}: Auto-Switch's query blocks "
                f"come from the evaluation split {o['split']!r}")
            train, train_from = test[:pool], o["split"]
        meta = {"dataset": ts.dataset.ref, "block_size": str(block), "text_column": col}
        _save_blocks(folder / "test.safetensors", test, {**meta, "split": o["split"]})
        _save_blocks(folder / "train.safetensors", train, {**meta, "split": train_from})
        log(f"download: {ts.name}: {len(test)} evaluation blocks of {block} tokens ({o['split']}), "
            f"{len(train)} query blocks ({train_from})")
        return {"test": len(test), "train": len(train), "train_split": train_from}

    # --- evaluate ---------------------------------------------------------------------

    def __init__(self, artifacts: Path, device="cpu", batch_size: int = 256):
        super().__init__(artifacts, device, batch_size)
        ckpts = self.artifacts / "checkpoints"
        self.lora = (ckpts / FROZEN).is_dir()
        self._config = load_config(ckpts / FROZEN if self.lora else ckpts / "base")
        self._backbone = None
        self._lora_config = None
        self._names: list[str] | None = None

    def _base_names(self) -> list[str]:
        if self._names is None:
            from mergeflow.io.checkpoint import Checkpoint

            self._names = Checkpoint(self.artifacts / "checkpoints" / "base").names()
        return self._names

    def build(self, state_dict):
        if not self.lora:
            return build_causal(self._config, state_dict, self.device)
        from peft import set_peft_model_state_dict

        if self._backbone is None:
            from mergeflow.io.checkpoint import Checkpoint

            self._backbone = build_causal(self._config, Checkpoint(self.artifacts / "checkpoints" / FROZEN).state_dict(), self.device)
            self._lora_config = lora_config(self.artifacts / "checkpoints" / "base")
        # a fresh module tree over the same backbone weights: each built model has its own adapter
        memo = {id(t): t for t in (*self._backbone.parameters(), *self._backbone.buffers())}
        model = _inject(copy.deepcopy(self._backbone, memo), self._lora_config)
        names = set(self._base_names())
        if unexpected := sorted(set(state_dict) - names):
            raise MergeflowError(f"build: unexpected tensor {unexpected[0]} in the state dict ({len(unexpected)} unexpected)")
        if missing := sorted(names - set(state_dict)):
            raise MergeflowError(f"build: tensor {missing[0]} missing from the state dict ({len(missing)} missing)")
        live = {lora_name(n): p for n, p in model.named_parameters() if ".lora_" in n}
        for n in names:
            if n not in live or tuple(live[n].shape) != tuple(state_dict[n].shape):
                raise MergeflowError(f"build: tensor {n} does not fit the adapter of {ADAPTER_CONFIG}")
        result = set_peft_model_state_dict(model, {k: v.to(self.device) for k, v in state_dict.items()}, low_cpu_mem_usage=True)
        if result.unexpected_keys:  # pragma: no cover - names were checked above
            raise MergeflowError(f"build: PEFT did not place tensor {result.unexpected_keys[0]}")
        if meta := [n for n, p in model.named_parameters() if p.is_meta]:  # pragma: no cover
            raise MergeflowError(f"build: tensor {lora_name(meta[0])} has no value")
        model.requires_grad_(False)
        return model.eval()

    def tensors(self, model):
        names = self._base_names()
        if self.lora:
            live = {lora_name(n): p for n, p in model.named_parameters() if ".lora_" in n}
        else:
            live = model.state_dict(keep_vars=True)
        return {n: live[n].detach() for n in names}

    def load_data(self, task, split, limit=None):
        return load_blocks(self.artifacts / "data" / task / f"{split}.safetensors", limit)

    def _device_of(self, model) -> torch.device:
        return next(model.parameters()).device

    def _micro_batch(self, block: int) -> int:
        vocab = max(int(getattr(self._config, "vocab_size", 1) or 1), 1)
        return max(1, min(self.batch_size, LOGITS_BUDGET // max(block * vocab, 1)))

    @torch.no_grad()
    def predict(self, model, task, data: Blocks, rows=None):
        ids = data.input_ids if rows is None else data.input_ids[rows]
        out = torch.zeros(len(ids), 2, dtype=torch.float64)
        if len(ids) == 0:
            return out
        device = self._device_of(model)
        step = self._micro_batch(ids.shape[1])
        for i in range(0, len(ids), step):
            x = ids[i:i + step].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            for j in range(len(x)):  # one row at a time in float32: no [batch, block, vocab] float32 copy
                nll = torch.nn.functional.cross_entropy(logits[j, :-1].float(), x[j, 1:], reduction="sum")
                out[i + j, 0] = float(nll)
            out[i:i + len(x), 1] = x.shape[1] - 1
            del logits
        return out

    def score(self, task, outputs, data):
        if len(data) == 0:
            raise MergeflowError(f"evaluate: task {task}: empty evaluation set")
        outputs = outputs.to(torch.float64).cpu()
        nll, tokens = float(outputs[:, 0].sum()), float(outputs[:, 1].sum())
        mean = nll / tokens
        return {"score": math.exp(-mean), "metric": "perplexity", "perplexity": math.exp(mean)}

    @torch.no_grad()
    def features(self, model, data: Blocks, rows=None):
        ids = data.input_ids if rows is None else data.input_ids[rows]
        hidden = getattr(self._config.get_text_config(), "hidden_size", None)
        if len(ids) == 0:
            return torch.zeros(0, hidden or 0)
        device = self._device_of(model)
        decoder = _decoder(model)
        step = self._micro_batch(ids.shape[1])
        feats = []
        for i in range(0, len(ids), step):
            h = decoder(input_ids=ids[i:i + step].to(device), use_cache=False).last_hidden_state
            feats.append(h.float().mean(1).cpu())
        return torch.cat(feats)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise MergeflowError(f"{folder}: cannot load the tokenizer ({' '.join(str(exc).split())[:160]})") from None

