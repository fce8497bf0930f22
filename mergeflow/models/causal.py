"""Model family for causal language models and their LoRA adapters, scored by 1/perplexity.

Full models (each task a fine-tune of the base) merge every tensor; LoRA adapters (each task a
PEFT adapter folder over the base) merge the factors ``lora_A`` / ``lora_B`` over a frozen
backbone. Evaluation data are token blocks of ``block_size``; ``predict`` gives per block (sum
of token NLL, predicted tokens) and ``score`` is 1/perplexity. The modes, layouts and data in
full: docs/family-causal.md.

The jobs live beside this module: :mod:`~mergeflow.models.causal_build` (architecture),
:mod:`~mergeflow.models.causal_lora` (adapters), :mod:`~mergeflow.models.causal_data` (token
blocks), :mod:`~mergeflow.models.causal_download` (the download stage). Their names are
re-exported here. transformers, peft and datasets are imported lazily.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models import causal_download
from mergeflow.models.causal_build import build_causal, decoder_of, load_config, model_names
from mergeflow.models.causal_data import Blocks, load_blocks, tokenise_blocks
from mergeflow.models.causal_download import TOKENIZER_FILES
from mergeflow.models.causal_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_PREFIX,
    SHARED_LORA_KEYS,
    Adapter,
    inject_lora,
    is_adapter,
    lora_config,
    lora_name,
    lora_shapes,
)
from mergeflow.models.family import FROZEN, Family, Sources

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LOGITS_BUDGET",
    "LORA_PREFIX",
    "SHARED_LORA_KEYS",
    "TOKENIZER_FILES",
    "Adapter",
    "Blocks",
    "CausalLM",
    "build_causal",
    "is_adapter",
    "load_blocks",
    "load_config",
    "lora_config",
    "lora_name",
    "lora_shapes",
    "model_names",
    "tokenise_blocks",
]

LOGITS_BUDGET = 1 << 27  # logits elements per forward pass (batch x block x vocab): 512 MB in float32


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
        return causal_download.prepare(sources, out, log)

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

            self._backbone = build_causal(
                self._config, Checkpoint(self.artifacts / "checkpoints" / FROZEN).state_dict(), self.device
            )
            self._lora_config = lora_config(self.artifacts / "checkpoints" / "base")
        # a fresh module tree over the same backbone weights: each built model has its own adapter
        memo = {id(t): t for t in (*self._backbone.parameters(), *self._backbone.buffers())}
        model = inject_lora(copy.deepcopy(self._backbone, memo), self._lora_config)
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
            x = ids[i : i + step].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            for j in range(len(x)):  # one row at a time in float32: no [batch, block, vocab] float32 copy
                nll = torch.nn.functional.cross_entropy(logits[j, :-1].float(), x[j, 1:], reduction="sum")
                out[i + j, 0] = float(nll)
            out[i : i + len(x), 1] = x.shape[1] - 1
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
        decoder = decoder_of(model)
        step = self._micro_batch(ids.shape[1])
        feats = []
        for i in range(0, len(ids), step):
            h = decoder(input_ids=ids[i : i + step].to(device), use_cache=False).last_hidden_state
            feats.append(h.float().mean(1).cpu())
        return torch.cat(feats)
