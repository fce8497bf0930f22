"""Causal LMs and LoRA adapters from the hub, offline: tiny Qwen2 models, a tiny BPE tokenizer, PEFT
adapters and parquet text datasets in a Hugging Face cache.

The real loading code runs (hub resolution, the family's prepare, PEFT, evaluation), checked
against transformers' and PEFT's own models.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mergeflow.errors import MergeflowError
from tests.hfcache import add_folder, pipeline_workspace, reported_rows

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "causal-lm.yaml"
EOS = "<|endoftext|>"
BLOCK = 16
PROSE = "the a one cat dog fox bird sat ran jumps over under on near lazy quick brown small red mat tree house".split()
CODE = "def return if else for in range x y z print ( ) : = + - * 0 1 2 import self class".split()
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def texts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(PROSE, 200, 0) + texts(CODE, 200, 1), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))
    return tok


def tiny_lm(vocab: int, eos: int, seed: int = 0, intermediate_size: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=eos,
        bos_token_id=eos,
    )
    return Qwen2ForCausalLM(config).eval()


def domain_blocks(tok, words: list[str], seed: int) -> torch.Tensor:
    ids = []
    for t in texts(words, 120, seed):
        ids += tok.encode(t).ids + [tok.token_to_id(EOS)]
    return torch.tensor(ids[: len(ids) // BLOCK * BLOCK]).reshape(-1, BLOCK)


def trained(model, blocks: torch.Tensor, steps: int = 30, lr: float = 3e-3):
    """A few full-batch AdamW steps of next-token loss on the blocks."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=blocks, labels=blocks).loss.backward()
        opt.step()
    return model.eval()


def fine_tune(base, blocks: torch.Tensor):
    import copy

    return trained(copy.deepcopy(base), blocks)


def adapter(base, folder: Path, seed: int, **overrides):
    """A PEFT LoRA adapter with random (non-zero) factors, saved as PEFT saves it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(**{**LORA, **overrides}, init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(folder))


def text_dataset(folder: Path, words: list[str], seed: int, splits=("train", "test"), column: str = "text") -> None:
    from datasets import Dataset

    for i, split in enumerate(splits):
        rows = texts(words, 60, seed + i)
        rows[3] = ""  # empty texts are skipped
        ds = Dataset.from_dict({column: rows, "id": list(range(len(rows)))})
        (folder / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (two threads on a busy two-core machine spin 50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline hub cache: a sharded tiny base, two fine-tunes, LoRA adapters, two text datasets."""
    work = tmp_path_factory.mktemp("causal")
    cache = work / "hub"
    d = work / "base"
    d.mkdir()
    tok = make_tokenizer(d)
    eos = tok.token_to_id(EOS)
    base = tiny_lm(tok.get_vocab_size(), eos)
    base.save_pretrained(str(d), max_shard_size="40KB")
    commits = {"base": add_folder(cache, "tiny/lm", d)}
    for i, (task, words) in enumerate((("prose", PROSE), ("code", CODE))):
        blocks = domain_blocks(tok, words, 50 + i)
        fine_tune(base, blocks).save_pretrained(str(work / task))  # one file: laid out like the base on the way in
        commits[task] = add_folder(cache, f"tiny/lm-{task}", work / task)
        adapter(base, work / f"lora-{task}", seed=20 + i)
        commits[f"lora-{task}"] = add_folder(cache, f"tiny/lora-{task}", work / f"lora-{task}")
    for name, overrides in {
        "r2": {"r": 2},
        "alpha": {"lora_alpha": 16},
        "targets": {"target_modules": ["q_proj", "k_proj"]},
    }.items():
        adapter(base, work / f"lora-{name}", seed=30, **overrides)
        add_folder(cache, f"tiny/lora-{name}", work / f"lora-{name}")
    text_dataset(work / "ds-prose", PROSE, 100)
    text_dataset(work / "ds-code", CODE, 200, splits=("test",))  # no train split: queries from the test blocks
    for task in ("prose", "code"):
        commits[f"ds-{task}"] = add_folder(cache, f"tiny/text-{task}", work / f"ds-{task}", repo_type="dataset")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {"work": work, "cache": cache, "commits": commits, "tok": tok, "eos": eos}


def swapped_preset(lora: bool = False) -> dict:
    """The causal-LM preset with its model and dataset names swapped for the tiny cached ones."""
    params = yaml.safe_load(PRESET.read_text())
    assert params["download"]["family"] == "causal_lm" and params["download"]["base"] == "hf://Qwen/Qwen2.5-0.5B"
    params["download"]["base"] = "hf://tiny/lm"
    kind = "lora" if lora else "lm"
    params["download"]["tasks"] = {
        t: {
            "model": f"hf://tiny/{kind}-{t}",
            "dataset": f"hf://datasets/tiny/text-{t}",
            "split": "test",
            "train_split": "train",
            "text_column": "text",
        }
        for t in ("prose", "code")
    }
    params["download"]["options"] = {"block_size": BLOCK, "max_blocks": 12, "query_pool": 6}
    params["compress"]["queries"] = 4
    if lora:
        params["compress"]["drop"] = 0.4  # the authors' LoRA setting
    params["merge"]["autoswitch"] = {"k": 3, "batch_size": 8}
    params["evaluate"] |= {"batch_size": 4, "limit": 8}
    params["experiment"] = "causal-tiny-lora" if lora else "causal-tiny"
    params["device"] = "cpu"
    return params


def download(params: dict, root: Path) -> Path:
    from mergeflow import stages
    from mergeflow.params import validate

    stages.run("download", validate(params), root)
    return root / "artifacts"


@pytest.fixture(scope="module")
def full(hub, tmp_path_factory):
    return download(swapped_preset(), tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora(hub, tmp_path_factory):
    return download(swapped_preset(lora=True), tmp_path_factory.mktemp("lora"))


def blocks_by_hand(hub, task: str, split: str) -> torch.Tensor:
    """The dataset's texts through the raw `tokenizers` tokenizer, EOS after each, cut into blocks."""
    import pyarrow.parquet as pq

    rows = pq.read_table(str(hub["work"] / f"ds-{task}" / "data" / f"{split}-00000-of-00001.parquet")).column("text").to_pylist()
    ids = []
    for t in rows:
        if t:
            ids += hub["tok"].encode(t).ids + [hub["eos"]]
    n = len(ids) // BLOCK
    return torch.tensor(ids[: n * BLOCK]).reshape(n, BLOCK)


# --- full models --------------------------------------------------------------------------


def test_preset_validates():
    from mergeflow.models.causal import CausalLM
    from mergeflow.params import load_params

    p = load_params(PRESET)
    assert p.download.family == "causal_lm" and set(p.download.options) <= set(CausalLM.options)
    for spec in p.download.tasks.values():
        assert spec["model"].startswith("hf://Qwen/Qwen2.5-") and spec["dataset"].startswith("hf://datasets/")


def test_sharded_in_sharded_out(full, hub):
    from safetensors.torch import load_file

    from mergeflow.io.checkpoint import Checkpoint

    src = json.loads((hub["work"] / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(src.values())) > 2 and "lm_head.weight" not in src  # tied: not stored
    sources = json.loads((full / "sources.json").read_text())
    assert sources["lora"] is False and sources["metrics"] == {"prose": "perplexity", "code": "perplexity"}
    assert sources["refs"]["code"]["model"]["commit"] == hub["commits"]["code"]
    for name in ("base", "prose", "code"):
        out = full / "checkpoints" / name
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == src  # the base's layout
        assert (out / "config.json").exists()
    assert (full / "checkpoints/base/tokenizer.json").exists() and not (full / "checkpoints/_frozen").exists()
    want = load_file(str(hub["work"] / "code" / "model.safetensors"))
    got = Checkpoint(full / "checkpoints/code")
    assert set(got.names()) == set(want)
    for name, t in want.items():
        assert torch.equal(got.get(name), t)


def test_blocks_are_the_texts_joined_with_eos(full, hub):
    from mergeflow.models.causal import CausalLM

    fam = CausalLM(full)
    for task in ("prose", "code"):
        want = blocks_by_hand(hub, task, "test")[:12]  # max_blocks
        assert torch.equal(fam.load_data(task, "test").input_ids, want)
    assert torch.equal(fam.load_data("prose", "train").input_ids, blocks_by_hand(hub, "prose", "train")[:6])
    # no train split: the query blocks are the first test blocks
    assert torch.equal(fam.load_data("code", "train").input_ids, blocks_by_hand(hub, "code", "test")[:6])
    assert len(fam.load_data("code", "test", limit=5)) == 5
    assert json.loads((full / "sources.json").read_text())["blocks"]["code"] == {"test": 12, "train": 6, "train_split": "test"}


def test_perplexity_is_transformers_loss(full, hub):
    """exp(mean token NLL) over the blocks = exp(mean of transformers' own per-block loss)."""
    from transformers import AutoModelForCausalLM

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import CausalLM

    fam = CausalLM(full, "cpu", batch_size=5)
    data = fam.load_data("prose", "test")
    model = fam.build(Checkpoint(full / "checkpoints/prose").state_dict())
    out = fam.predict(model, "prose", data)
    assert out.dtype == torch.float64 and out.shape == (12, 2) and torch.all(out[:, 1] == BLOCK - 1)
    ref = AutoModelForCausalLM.from_pretrained(str(hub["work"] / "prose")).eval()
    with torch.no_grad():
        losses = [float(ref(input_ids=x[None], labels=x[None]).loss) for x in data.input_ids]
    torch.testing.assert_close(out[:, 0] / (BLOCK - 1), torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    s = fam.score("prose", out, data)
    ppl = math.exp(sum(losses) / len(losses))
    assert s["metric"] == "perplexity" and s["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert s["score"] == pytest.approx(1 / ppl, rel=1e-5) and 0 < s["score"] <= 1
    rows = torch.tensor([7, 2])
    torch.testing.assert_close(fam.predict(model, "prose", data, rows), out[rows])
    with torch.no_grad():
        h = ref.model(input_ids=data.input_ids[rows]).last_hidden_state.mean(1)
    feats = fam.features(model, data, rows)
    assert feats.dtype == torch.float32 and feats.shape == (2, 32)
    torch.testing.assert_close(feats, h, rtol=1e-5, atol=1e-5)


def test_build_shares_memory_and_tensors_edit_the_model(full):
    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import CausalLM

    fam = CausalLM(full)
    sd = Checkpoint(full / "checkpoints/base").state_dict()
    model = fam.build(sd)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    live = fam.tensors(model)
    assert set(live) == set(sd)
    assert all(live[n].data_ptr() == sd[n].data_ptr() for n in sd)  # no copy
    x = fam.load_data("prose", "test", limit=2).input_ids
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        live["model.embed_tokens.weight"].mul_(2.0)  # the tied head sees it too
        live["model.layers.0.mlp.down_proj.weight"].zero_()
        after = model(input_ids=x).logits
    edited = {k: v.clone() for k, v in sd.items()}
    with torch.no_grad():
        want = CausalLM(full).build(edited)(input_ids=x).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want)
    with pytest.raises(MergeflowError, match=r"^build: tensor model\.norm\.weight missing"):
        fam.build({k: v for k, v in sd.items() if k != "model.norm.weight"})


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_exemplar_statistics_carry_checkpoint_names(kind, request):
    """CAT's layer-input statistics are keyed by the checkpoint's names (LoRA factors are named
    otherwise inside PEFT's model); the tied LM head (the embedding) gets none."""
    from mergeflow.layer_stats import layer_input_stats
    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import CausalLM
    from mergeflow.stages.merge import _checkpoint_names

    art = request.getfixturevalue(kind)
    fam = CausalLM(art)
    names = set(Checkpoint(art / "checkpoints/base").names())
    model = fam.build(Checkpoint(art / "checkpoints/prose").state_dict())
    mapping = _checkpoint_names(model, fam.tensors(model), names)
    assert set(mapping.values()) <= names and len(set(mapping.values())) == len(mapping)
    data = fam.load_data("prose", "test", limit=2)
    stats = layer_input_stats(model, lambda: fam.predict(model, "prose", data), list(mapping))
    keyed = {mapping[k]: v for k, v in stats.items()}
    if kind == "lora":
        a = next(n for n in keyed if ".lora_A." in n)
        assert keyed[a].kind == "linear" and keyed[a].value.shape == (32, 32)  # the hidden state entering q/v
        assert all(".lora_" in n for n in keyed)
    else:
        assert "model.embed_tokens.weight" not in keyed  # tied to lm_head: another layer's input
        assert keyed["model.layers.0.mlp.down_proj.weight"].value.shape == (64, 64)
        assert keyed["model.norm.weight"].kind == "scale"


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_building_in_threads_leaves_other_threads_modules_alone(kind, request):
    """Stage units build models in parallel threads: a build must not put the modules that other
    threads make meanwhile on the meta device, nor leave ``nn.Module`` patched afterwards (an
    ``init_empty_weights``-style global patch, entered by two threads at once, stays for good)."""
    import threading

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import CausalLM

    art = request.getfixturevalue(kind)
    sd = Checkpoint(art / "checkpoints/base").state_dict()
    stop, errors = threading.Event(), []

    def builder():
        try:
            fam = CausalLM(art)
            while not stop.is_set():
                fam.build(dict(sd))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        meta = [i for i in range(300) if torch.nn.Linear(4, 4).weight.is_meta]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert meta == [], f"{len(meta)} of 300 modules made on the meta device while models were built"
    assert not torch.nn.Linear(4, 4).weight.is_meta


def test_mismatched_fine_tune_names_file_and_tensor(hub, tmp_path):
    bad = tmp_path / "bad"
    tiny_lm(hub["tok"].get_vocab_size(), hub["eos"], intermediate_size=48).save_pretrained(str(bad))
    params = swapped_preset()
    params["download"]["tasks"]["code"]["model"] = str(bad)
    with pytest.raises(MergeflowError) as exc:
        download(params, tmp_path / "ws")
    msg = str(exc.value)
    assert "\n" not in msg and "model.safetensors" in msg and "model.layers.0.mlp.gate_proj.weight" in msg and "[48, 32]" in msg


def test_missing_text_column_is_one_line(hub, tmp_path):
    params = swapped_preset()
    params["download"]["tasks"]["prose"]["text_column"] = "content"
    with pytest.raises(MergeflowError) as exc:
        download(params, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "tiny/text-prose" in msg and "'content'" in msg
    assert not (tmp_path / "artifacts/checkpoints").exists()


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_base_is_zeros_and_task_vector_the_factors(lora, hub):
    from safetensors.torch import load_file

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.vectors import iter_task_vector

    sources = json.loads((lora / "sources.json").read_text())
    assert sources["lora"] is True and sources["lora_r"] == 4 and sources["lora_alpha"] == 8
    base = Checkpoint(lora / "checkpoints/base")
    assert all(not base.get(n).any() for n in base.names())
    assert (lora / "checkpoints/base/adapter_config.json").exists()
    frozen = Checkpoint(lora / "checkpoints/_frozen")
    assert (
        json.loads((lora / "checkpoints/_frozen/model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((hub["work"] / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert "model.norm.weight" in frozen.names()
    for task in ("prose", "code"):
        factors = load_file(str(hub["work"] / f"lora-{task}" / "adapter_model.safetensors"))
        assert set(base.names()) == set(factors) and any(".lora_B." in n for n in factors)
        tau = dict(iter_task_vector(base, Checkpoint(lora / "checkpoints" / task)))
        assert set(tau) == set(factors)
        for name, t in factors.items():
            assert torch.equal(tau[name], t.float())


def test_lora_build_is_peft(lora, hub):
    """Factors of adapter t: PeftModel.from_pretrained(backbone, adapter t)'s logits; zero factors: the backbone's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import CausalLM

    fam = CausalLM(lora, "cpu", batch_size=4)
    x = fam.load_data("prose", "test", limit=3).input_ids
    backbone = AutoModelForCausalLM.from_pretrained(str(hub["work"] / "base")).eval()
    with torch.no_grad():
        plain = backbone(input_ids=x).logits
    sd = Checkpoint(lora / "checkpoints/prose").state_dict()
    model = fam.build(sd)
    zero = fam.build(Checkpoint(lora / "checkpoints/base").state_dict())  # a second model: the first keeps its factors
    ref = PeftModel.from_pretrained(backbone, str(hub["work"] / "lora-prose")).eval()
    with torch.no_grad():
        want = ref(input_ids=x).logits
        got = model(input_ids=x).logits
        torch.testing.assert_close(zero(input_ids=x).logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # tensors(): the factors themselves, by checkpoint name; in-place edits are seen
    live = fam.tensors(model)
    assert set(live) == set(sd) and all(live[n].data_ptr() == sd[n].data_ptr() for n in sd)
    for n, t in live.items():
        if ".lora_B." in n:
            t.zero_()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=1e-5, atol=1e-5)
    # perplexity through PEFT's model, as in the full case
    data = fam.load_data("code", "test", limit=4)
    out = fam.predict(fam.build(Checkpoint(lora / "checkpoints/code").state_dict()), "code", data)
    ref_code = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(hub["work"] / "base")), str(hub["work"] / "lora-code")
    ).eval()
    with torch.no_grad():
        losses = torch.tensor(
            [float(ref_code(input_ids=r[None], labels=r[None]).loss) for r in data.input_ids], dtype=torch.float64
        )
    torch.testing.assert_close(out[:, 0] / (BLOCK - 1), losses, rtol=1e-5, atol=1e-5)


def test_lora_names_are_normalised(lora, hub, tmp_path):
    """An adapter saved with adapter names in its keys and no PEFT prefix gives the same checkpoint."""
    from safetensors.torch import load_file, save_file

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.causal import lora_name

    assert (
        lora_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert lora_name("model.embed_tokens.lora_embedding_B.default") == "base_model.model.model.embed_tokens.lora_embedding_B"
    src = hub["work"] / "lora-code"
    odd = tmp_path / "odd-adapter"
    odd.mkdir()
    shutil.copy(src / "adapter_config.json", odd / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed = {
        k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in tensors.items()
    }
    assert not set(renamed) & set(tensors)
    save_file(renamed, str(odd / "adapter_model.safetensors"))
    params = swapped_preset(lora=True)
    params["download"]["tasks"]["code"]["model"] = str(odd)
    art = download(params, tmp_path / "ws")
    got = Checkpoint(art / "checkpoints/code")
    assert set(got.names()) == set(tensors)
    assert all(torch.equal(got.get(n), t) for n, t in tensors.items())


@pytest.mark.parametrize("other, field", [("r2", "r"), ("alpha", "lora_alpha"), ("targets", "target_modules")])
def test_mismatched_adapters_name_the_file(hub, tmp_path, other, field):
    params = swapped_preset(lora=True)
    params["download"]["tasks"]["code"]["model"] = f"hf://tiny/lora-{other}"
    with pytest.raises(MergeflowError) as exc:
        download(params, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and f"lora-{other}" in msg and "adapter_config.json" in msg and f"{field} " in msg


def test_adapters_and_full_models_do_not_mix(hub, tmp_path):
    params = swapped_preset(lora=True)
    params["download"]["tasks"]["code"]["model"] = "hf://tiny/lm-code"
    with pytest.raises(MergeflowError, match=r"^download\.tasks: prose is a LoRA adapter .* but code is a full model") as exc:
        download(params, tmp_path)
    assert "\n" not in str(exc.value)


# --- the whole pipeline -----------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_preset_runs_every_stage_offline(hub, tmp_path, prefect_server, mode):
    """`mergeflow run --params <the causal-LM preset>` with tiny cached names, no network."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = swapped_preset(lora=mode == "lora")
    params["download"]["offline"] = True
    ws = pipeline_workspace(tmp_path / "ws", params)
    # MLflow's record of a run is test_pipeline's and the CLIP preset's to check
    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert metrics["task_metrics"] == {"prose": "perplexity", "code": "perplexity"}
    rows = reported_rows(params["merge"]["methods"])  # the preset's methods: every family runs them all
    assert {"tsv_m", "iso_cts", "cart", "lines", "cabs", "tvq", "rtvq", "tsv_c"} <= rows
    assert set(metrics["methods"]) == rows
    for row in [metrics["base"], metrics["experts"], *metrics["methods"].values()]:
        assert set(row["acc"]) == {"prose", "code"} and all(0.0 < a <= 1.0 for a in row["acc"].values())
    for task in ("prose", "code"):
        assert metrics["experts"]["acc"][task] == pytest.approx(1 / metrics["experts"]["perplexity"][task])
        if mode == "full":  # each fine-tune was trained on its domain: far lower perplexity than the base there
            assert metrics["experts"]["perplexity"][task] < 0.5 * metrics["base"]["perplexity"][task]
    if mode == "lora":  # a merged adapter is a PEFT adapter folder: PEFT loads it as it is
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from mergeflow.io.checkpoint import Checkpoint
        from mergeflow.models.causal import CausalLM

        merged = ws / "artifacts/merged/task_arithmetic"
        assert json.loads((merged / "adapter_config.json").read_text())["r"] == LORA["r"]
        assert (merged / "adapter_model.safetensors").exists() and not (merged / "model.safetensors").exists()
        fam = CausalLM(ws / "artifacts", "cpu", batch_size=4)
        x = fam.load_data("prose", "test", limit=2).input_ids
        backbone = AutoModelForCausalLM.from_pretrained(str(hub["work"] / "base")).eval()
        with torch.no_grad():
            want = PeftModel.from_pretrained(backbone, str(merged)).eval()(input_ids=x).logits
            got = fam.build(Checkpoint(merged).state_dict())(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "extract", "compress", "merge", "evaluate"}
