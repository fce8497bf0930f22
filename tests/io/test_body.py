"""Raw Hugging Face fine-tunes into `mergeflow merge` (issue 17, friction 1): the experts' names
carry `bert.` and a per-task classifier, the base is a bare BertModel whose file keeps the legacy
`embeddings.position_ids` buffer; the body merges, the heads are never merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

CFG = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32
)


def bert_base(folder: Path, seed: int = 0, legacy_buffer: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**CFG))
    model.save_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    if legacy_buffer:  # as all-MiniLM-L6-v2's file keeps it
        sd["embeddings.position_ids"] = torch.arange(CFG["max_position_embeddings"]).unsqueeze(0)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sd


def expert(folder: Path, base: dict[str, torch.Tensor], seed: int, labels: list[str]) -> dict[str, torch.Tensor]:
    """A BertForSequenceClassification fine-tune of ``base``: the body moved a little, its own head."""
    cfg = transformers.BertConfig(**CFG, id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(seed)
    body = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    body.pop("embeddings.position_ids", None)
    missing, unexpected = model.bert.load_state_dict(body, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m]
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture
def raw(tmp_path):
    base = bert_base(tmp_path / "minilm")
    experts = {
        name: expert(tmp_path / "experts" / name, base, seed, labels)
        for seed, (name, labels) in enumerate([("sst", ["neg", "pos"]), ("topic", ["a", "b", "c"]), ("nli", ["yes", "no"])], 1)
    }
    return tmp_path, base, experts


def merge(*args: str):
    from flows.cli import app

    return CliRunner().invoke(app, ["merge", *args])


def test_raw_bert_fine_tunes_merge_and_keep_their_heads(raw):
    tmp, base, experts = raw
    out = tmp / "out"
    paths = [str(tmp / "experts" / n) for n in experts]
    res = merge("--method", "task_arithmetic", "--set", "scaling=0.5", "--base", str(tmp / "minilm"), "--out", str(out), *paths)
    assert res.exit_code == 0, res.output
    assert f"heads, not merged: {out / 'heads'}/{{sst,topic,nli}}.safetensors" in res.output
    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base)  # the base's names, its buffer included; no head
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            assert torch.equal(merged[name], theta0)
            continue
        want = theta0 + 0.5 * sum(e["bert." + name] - theta0 for e in experts.values())  # METHODS.md: TA
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    for name, sd in experts.items():
        heads = load_file(str(out / "heads" / f"{name}.safetensors"))
        assert heads.keys() == {"classifier.weight", "classifier.bias"}
        assert all(torch.equal(heads[k], sd[k]) for k in heads)
        with safe_open(str(out / "heads" / f"{name}.safetensors"), "pt") as fh:
            meta = fh.metadata()
        cfg = json.loads(meta["config"])
        assert meta["prefix"] == "bert." and meta["architecture"] == "BertForSequenceClassification"
        assert (
            cfg["label2id"] == {v: int(k) for k, v in cfg["id2label"].items()}
            and len(cfg["id2label"]) == heads["classifier.bias"].numel()
        )


def test_a_classification_base_never_has_its_head_merged(tmp_path):
    """Base and experts all BertForSequenceClassification with two labels: names match one to one,
    yet the classifiers are heads (outside `bert.`), written per task and never averaged."""
    bert_base(tmp_path / "bare", legacy_buffer=False)
    torch.manual_seed(5)
    cls_base = transformers.BertForSequenceClassification(transformers.BertConfig(**CFG))
    cls_base.save_pretrained(tmp_path / "base")
    base_sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    body = {k[5:]: v for k, v in base_sd.items() if k.startswith("bert.")}
    a = expert(tmp_path / "a", body, 1, ["x", "y"])
    b = expert(tmp_path / "b", body, 2, ["x", "y"])
    out = tmp_path / "out"
    res = merge("--method", "ties", "--base", str(tmp_path / "base"), "--out", str(out), str(tmp_path / "a"), str(tmp_path / "b"))
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "model.safetensors"))
    assert not [n for n in merged if n.startswith("classifier.")] and all(n.startswith("bert.") for n in merged)
    for label, sd in (("a", a), ("b", b)):
        heads = load_file(str(out / "heads" / f"{label}.safetensors"))
        assert torch.equal(heads["classifier.weight"], sd["classifier.weight"])
    _, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_base_tensors_no_model_has_are_kept_and_said(raw):
    tmp, base, experts = raw
    for name in experts:  # fine-tunes saved without the pooler
        f = tmp / "experts" / name / "model.safetensors"
        sd = {k: v for k, v in load_file(str(f)).items() if not k.startswith("bert.pooler.")}
        save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp / "out"
    res = merge(
        "--method",
        "task_arithmetic",
        "--base",
        str(tmp / "minilm"),
        "--out",
        str(out),
        *[str(tmp / "experts" / n) for n in experts],
    )
    assert res.exit_code == 0, res.output
    assert (
        "mergeflow: warning: 2 base tensors no model has (e.g. pooler.dense.bias) are kept from the base, not merged"
        in res.output
    )
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["pooler.dense.weight"], base["pooler.dense.weight"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("family-none", r"^mergeflow: error: .*sst: no body tensor in common with the base \(the base has bare names, e.g. 'embeddings.LayerNorm.bias'; the model has bare names, e.g. 'bert.embeddings.LayerNorm.bias'\): not a fine-tune of this base$"),
        ("other-width", r"^mergeflow: error: .*sst: tensor bert.embeddings.LayerNorm.bias has shape \[8\], the base's embeddings.LayerNorm.bias has \[16\]$"),
        ("extra-tensor", r"^mergeflow: error: .*sst: tensor bert.adapter.weight is not in the base's body \(1 such; the base has bare names, the model names under 'bert.'\)$"),
        ("unrelated", r"^mergeflow: error: .*sst: tensor embeddings.LayerNorm.bias of the base's body is missing \(39 missing; the base has bare names, the model names under 'bert.'\)$"),
    ],
)  # fmt: skip
def test_mismatches_are_one_line_naming_both_sides(raw, case, message):
    tmp, base, experts = raw
    args = ["--method", "task_arithmetic", "--base", str(tmp / "minilm"), "--out", str(tmp / "out")]
    sst = tmp / "experts" / "sst" / "model.safetensors"
    if case == "family-none":
        args += ["--family", "none"]
    elif case == "other-width":
        other = dict(CFG, hidden_size=8, intermediate_size=16)
        transformers.BertForSequenceClassification(transformers.BertConfig(**other)).save_pretrained(tmp / "experts" / "sst")
    elif case == "extra-tensor":
        save_file({**load_file(str(sst)), "bert.adapter.weight": torch.zeros(2, 2)}, str(sst), metadata={"format": "pt"})
    elif case == "unrelated":
        save_file(
            {"bert.other.weight": torch.zeros(2, 2), "classifier.weight": torch.zeros(2, 2)}, str(sst), metadata={"format": "pt"}
        )
    res = merge(*args, str(tmp / "experts" / "sst"), str(tmp / "experts" / "topic"))
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.startswith("mergeflow: error:")]
    assert len(lines) == 1 and __import__("re").match(message, lines[0]), res.output
    assert not (tmp / "out").exists()


def test_head_labels_are_unique_and_file_safe():
    from mergeflow.io.body import head_labels

    assert head_labels(["a/sst", "b/sst/", "hf://org/my model@v1", "x.safetensors"]) == [
        "sst",
        "sst-2",
        "my_model",
        "x.safetensors",
    ]


def sum_of_two(tmp_path: Path):
    """``mergeflow merge`` of ``e1`` and ``e2`` onto ``base`` by Task Arithmetic at 1.0 (the sum of
    their task vectors): (the CLI result, the output folder)."""
    out = tmp_path / "out"
    args = ["--method", "task_arithmetic", "--set", "scaling=1.0", "--base", str(tmp_path / "base"), "--out", str(out)]
    return merge(*args, str(tmp_path / "e1"), str(tmp_path / "e2")), out


def test_clip_vision_experts_onto_a_full_clip_base(tmp_path):
    """A CLIPModel base (text and vision towers) and CLIPVisionModel fine-tunes: the vision tower
    merges, the text tower no expert has is kept from the base; the output loads as a CLIPModel."""
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=16,
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for i in (1, 2):
        expert = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
        names = expert.state_dict()  # bare names in transformers 5 (vision_model.* in older files): both map
        sd = {k: base[b] + 0.1 * i for k in names for b in (k, "vision_model." + k) if b in base and base[b].is_floating_point()}
        assert len(sd) == len([k for k, v in names.items() if v.is_floating_point()])
        expert.load_state_dict(sd, strict=False)
        expert.save_pretrained(tmp_path / f"e{i}")
    res, out = sum_of_two(tmp_path)
    assert res.exit_code == 0, res.output
    assert "base tensors no model has (e.g. logit_scale) are kept from the base, not merged" in res.output
    merged = load_file(str(out / "model.safetensors"))
    _, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    name = "vision_model.embeddings.patch_embedding.weight"
    torch.testing.assert_close(merged[name], base[name] + 0.3, rtol=0, atol=1e-5)  # TA at 1.0: + 0.1 + 0.2
    assert all(torch.equal(merged[k], base[k]) for k in base if k.startswith("text_model."))
    assert not (out / "heads").exists()


def _tiny(kind: str):
    """(base model, expert model class, expert config) of a tiny model of each family."""
    t = transformers
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=40, max_position_embeddings=16, **small)
        return t.BertModel(cfg), t.BertForSequenceClassification, cfg
    if kind == "roberta":
        cfg = t.RobertaConfig(vocab_size=40, max_position_embeddings=20, **small)
        return t.RobertaModel(cfg, add_pooling_layer=False), t.RobertaForSequenceClassification, cfg
    if kind == "deberta-v2":
        cfg = t.DebertaV2Config(vocab_size=40, max_position_embeddings=16, pooler_hidden_size=16, **small)
        return t.DebertaV2Model(cfg), t.DebertaV2ForSequenceClassification, cfg
    if kind == "vit":
        cfg = t.ViTConfig(image_size=8, patch_size=4, **small)
        return t.ViTModel(cfg, add_pooling_layer=False), t.ViTForImageClassification, cfg
    cfg = t.LlamaConfig(vocab_size=40, max_position_embeddings=16, num_key_value_heads=2, **small)
    return t.LlamaForCausalLM(cfg), t.LlamaForCausalLM, cfg


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2", "vit", "llama"])
def test_every_family_merges_raw_fine_tunes(tmp_path, kind):
    """A bare base (or, for a causal LM, the LM itself) and two raw fine-tunes made from it with
    transformers (which names them as it saves them): the body merges as Task Arithmetic defines
    it, loads in the base's class, and only classification heads stay apart."""
    torch.manual_seed(0)
    base, cls, cfg = _tiny(kind)
    base.save_pretrained(tmp_path / "base")
    base_sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    experts = []
    for i in (1, 2):
        expert = (
            cls.from_pretrained(tmp_path / "base", num_labels=3) if kind != "llama" else cls.from_pretrained(tmp_path / "base")
        )
        with torch.no_grad():
            for param in (expert if kind == "llama" else expert.base_model).parameters():
                param.add_(0.01 * i)
        expert.save_pretrained(tmp_path / f"e{i}")
        experts.append(load_file(str(tmp_path / f"e{i}" / "model.safetensors")))
    res, out = sum_of_two(tmp_path)
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "model.safetensors"))
    prefix = "" if kind == "llama" else cls.base_model_prefix + "."
    moved = 0
    for name, theta0 in base_sd.items():
        if theta0.is_floating_point():
            taus = [e[prefix + name if prefix + name in e else name] - theta0 for e in experts]
            moved += bool(taus[0].abs().max() > 0)
            torch.testing.assert_close(merged[name], theta0 + taus[0] + taus[1], rtol=0, atol=1e-6)
    assert moved >= len(base_sd) // 2  # the fine-tunes moved their bodies: the sums above can fail
    keep = {"add_pooling_layer": False} if kind in ("roberta", "vit") else {}
    _, info = type(base).from_pretrained(out, output_loading_info=True, **keep)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    heads = sorted(p.name for p in (out / "heads").glob("*")) if (out / "heads").exists() else []
    assert heads == ([] if kind == "llama" else ["e1.safetensors", "e2.safetensors"])
