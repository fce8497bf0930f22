"""LiNeS, the layer-depth map it uses, and CABS, against their definitions (docs/method-notes.md,
sections lines and cabs, and docs/internals.md, section layers).

LiNeS: result = (alpha + beta * l/(L-1)) * base_method(taus; scaling 1), l the 0-based block of
L in the main stack, names outside it at l = 0; alpha None = (1/T) ||sum tau||_1 / ||tau_MTL||_1.
CABS: per tensor, blocks of m consecutive entries; tasks in ``order`` each keep the n largest
|tau_t| of a block among the positions earlier tasks left (ties: lower index first), the
tail of r < m entries keeps floor(n r / m); result sum_t lambda_t mask_t tau_t.
References here are plain loops and sorts, never the library's helpers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import mergeflow.methods.cabs  # noqa: F401  (registers cabs)
import mergeflow.methods.lines  # noqa: F401  (registers lines)
from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.layers import layer_depths
from mergeflow.merge import TaskVectors, merge, merge_state_dicts


# --------------------------------------------------------------------------- helpers


def one(name, base, models, /, device="cpu", **hp):
    out = merge_state_dicts(methods.get(name), base, models, hp, device=device)
    assert len(out) == 1
    return out[0]


def delta(merged, base):
    return {k: merged[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


def close(a, b, atol=1e-5, rtol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), f"\n{a}\n!=\n{b}"


SHAPES = {
    "embed.weight": (10, 6),
    "enc.layers.0.attn.weight": (6, 6),
    "enc.layers.0.norm.bias": (6,),
    "enc.layers.1.attn.weight": (6, 6),
    "enc.layers.2.attn.weight": (6, 6),
    "enc.layers.3.attn.weight": (6, 6),
    "enc.layers.3.norm.bias": (6,),
    "final_norm.weight": (6,),
    "head.weight": (3, 6),
}
DEPTH = {
    "embed.weight": 0,
    "enc.layers.0.attn.weight": 0,
    "enc.layers.0.norm.bias": 0,
    "enc.layers.1.attn.weight": 1,
    "enc.layers.2.attn.weight": 2,
    "enc.layers.3.attn.weight": 3,
    "enc.layers.3.norm.bias": 3,
    "final_norm.weight": 0,
    "head.weight": 0,
}


def stack_model(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def finetunes(base, n, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


# --------------------------------------------------------------------------- layer_depths


def test_layer_depths_synthetic_rules():
    names = ["emb.w", "enc.layers.0.w", "enc.layers.1.w", "enc.layers.3.b", "norm.w"]
    assert layer_depths(names) == {
        "emb.w": (0, 4),
        "enc.layers.0.w": (0, 4),
        "enc.layers.1.w": (1, 4),
        "enc.layers.3.b": (3, 4),
        "norm.w": (0, 4),
    }  # L = largest index + 1
    # the main stack is the one with most distinct indices; others count as outside (depth 0)
    names = ["a.layers.0.x", "a.layers.1.x", "b.h.0.x", "b.h.1.x", "b.h.2.x", "b.h.2.mlp.layers.0.y"]
    d = layer_depths(names)
    assert d["b.h.2.x"] == (2, 3) and d["a.layers.1.x"] == (0, 3) and d["b.h.2.mlp.layers.0.y"] == (2, 3)
    # a tie goes to the stack named first; names like "xlayers.3." or an index with no dot after are not blocks
    d = layer_depths(["t.layers.0.w", "t.layers.1.w", "v.layers.0.w", "v.layers.1.w", "xlayers.5.w", "blocks.7"])
    assert d["t.layers.1.w"] == (1, 2) and d["v.layers.1.w"] == (0, 2) and d["xlayers.5.w"] == (0, 2)
    # every recognised kind
    for kind in ("layers", "layer", "h", "blocks", "resblocks"):
        assert layer_depths([f"m.{kind}.0.w", f"m.{kind}.4.w", "m.out"])[f"m.{kind}.4.w"] == (4, 5)
    # open_clip naming, as in the LiNeS authors' checkpoints
    oc = [
        "model.visual.class_embedding",
        "model.visual.conv1.weight",
        "model.visual.ln_pre.weight",
        *[f"model.visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(12)],
        "model.visual.ln_post.weight",
        "model.visual.proj",
    ]
    d = layer_depths(oc)
    assert d["model.visual.transformer.resblocks.11.attn.in_proj_weight"] == (11, 12)
    assert d["model.visual.proj"] == d["model.visual.ln_post.weight"] == d["model.visual.conv1.weight"] == (0, 12)


def test_layer_depths_no_stack_is_one_line_error():
    with pytest.raises(MergeflowError, match=r"^layer_depths: no block stack") as e:
        layer_depths(["embed.weight", "fc1.weight", "fc2.bias"])
    assert "\n" not in str(e.value)
    with pytest.raises(MergeflowError):
        layer_depths([])


def _check_family(names, stack: str, L: int, outside: list[str]):
    d = layer_depths(names)
    assert set(d) == set(names)
    for name in names:
        if name.startswith(stack + "."):
            i = int(name[len(stack) + 1 :].split(".")[0])
            assert d[name] == (i, L), name
        else:
            assert d[name] == (0, L), name
    for name in outside:
        assert name in d and d[name] == (0, L), name


def test_layer_depths_zoo_clip_vision():
    from mergeflow.zoo import ZooSpec, make_config
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    spec = ZooSpec(hidden_size=16, num_heads=2, intermediate_size=32, projection_dim=8, num_layers=3)
    names = list(CLIPVisionModelWithProjection(make_config(spec)).state_dict())
    _check_family(
        names,
        "vision_model.encoder.layers",
        3,
        [
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.pre_layrnorm.weight",
            "vision_model.post_layernorm.weight",
            "visual_projection.weight",
        ],
    )
    plain = list(CLIPVisionModel(make_config(spec)).state_dict())
    stack = next(n for n in plain if ".layers.0." in n).split(".layers.0.")[0] + ".layers"
    _check_family(plain, stack, 3, [n for n in plain if "post_layernorm" in n])


def test_layer_depths_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=20,
        num_labels=2,
    )
    names = list(RobertaForSequenceClassification(cfg).state_dict())
    _check_family(
        names,
        "roberta.encoder.layer",
        3,
        ["roberta.embeddings.word_embeddings.weight", "classifier.dense.weight", "classifier.out_proj.bias"],
    )


def test_layer_depths_qwen2_and_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    names = list(model.state_dict())
    _check_family(names, "model.layers", 4, ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lnames = [n for n in lora.state_dict() if ".lora_A." in n or ".lora_B." in n]
    assert lnames
    d = layer_depths(lnames)
    for n in lnames:
        assert d[n] == (int(n.split(".layers.")[1].split(".")[0]), 4), n


def test_layer_depths_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    names = list(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=3, n_head=2)).state_dict())
    _check_family(names, "transformer.h", 3, ["transformer.wte.weight", "transformer.ln_f.weight"])


# --------------------------------------------------------------------------- LiNeS


def test_lines_hand_computed():
    # 2 tasks, 3 blocks: factors alpha + beta l/2 = 0.5, 1.0, 1.5 (alpha 0.5, beta 1); "emb" outside: 0.5
    base = {"emb": torch.zeros(2), "layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2), "layers.2.w": torch.zeros(2)}
    t1 = {
        "emb": torch.tensor([2.0, 0.0]),
        "layers.0.w": torch.tensor([1.0, 2.0]),
        "layers.1.w": torch.tensor([1.0, 1.0]),
        "layers.2.w": torch.tensor([-2.0, 4.0]),
    }
    t2 = {
        "emb": torch.tensor([0.0, 4.0]),
        "layers.0.w": torch.tensor([3.0, -1.0]),
        "layers.1.w": torch.tensor([0.0, 2.0]),
        "layers.2.w": torch.tensor([2.0, 0.0]),
    }
    out = one("lines", base, [t1, t2], alpha=0.5, beta=1.0)
    assert torch.equal(out["emb"], torch.tensor([1.0, 2.0]))  # 0.5 * [2, 4]
    assert torch.equal(out["layers.0.w"], torch.tensor([2.0, 0.5]))  # 0.5 * [4, 1]
    assert torch.equal(out["layers.1.w"], torch.tensor([1.0, 3.0]))  # 1.0 * [1, 3]
    assert torch.equal(out["layers.2.w"], torch.tensor([0.0, 6.0]))  # 1.5 * [0, 4]
    # the paper's default alpha over Task Arithmetic: 1/T
    out = one("lines", base, [t1, t2], beta=1.0)
    assert torch.equal(out["layers.0.w"], torch.tensor([2.0, 0.5]))  # alpha = 1/2


@pytest.mark.parametrize(
    "base_method,options", [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("consensus", {"k": 2, "threshold": 0.3})]
)
def test_lines_beta_zero_is_base_scaled_by_alpha(base_method, options):
    base = stack_model()
    fts = finetunes(base, 3)
    got = delta(one("lines", base, fts, base=base_method, options=options, alpha=0.7, beta=0.0), base)
    want = delta(one(base_method, base, fts, **options, scaling=0.7), base)
    for k in want:
        close(got[k], want[k])


@pytest.mark.parametrize(
    "base_method,options",
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "scope": "global"}),
        ("consensus", {"k": 2}),
        ("consensus", {"merge": "ties", "k": 1}),
    ],
)
def test_lines_is_base_times_layer_factor(base_method, options):
    base = stack_model()
    fts = finetunes(base, 4)
    alpha, beta = 0.2, 0.9
    got = delta(one("lines", base, fts, base=base_method, options=options, alpha=alpha, beta=beta), base)
    unscaled = delta(one(base_method, base, fts, **options, scaling=1.0), base)
    for k in SHAPES:
        lam = alpha + beta * DEPTH[k] / 3  # L = 4 blocks
        close(got[k], lam * unscaled[k])
    # first block alpha, last block alpha + beta, linear in between
    ratios = [float(got[f"enc.layers.{i}.attn.weight"].norm() / unscaled[f"enc.layers.{i}.attn.weight"].norm()) for i in range(4)]
    assert ratios[0] == pytest.approx(alpha) and ratios[3] == pytest.approx(alpha + beta)
    steps = [b - a for a, b in zip(ratios, ratios[1:])]
    assert all(s == pytest.approx(beta / 3) for s in steps)


@pytest.mark.parametrize("base_method,options", [("ties", {"density": 0.3}), ("consensus", {"k": 2})])
def test_lines_default_alpha_is_the_papers_rule(base_method, options):
    base = stack_model()
    fts = finetunes(base, 3)
    unscaled = delta(one(base_method, base, fts, **options, scaling=1.0), base)
    taus = [{k: f[k] - base[k] for k in base} for f in fts]
    summed = sum(float(sum(t[k] for t in taus).abs().double().sum()) for k in base)
    merged = sum(float(unscaled[k].abs().double().sum()) for k in base)
    alpha = summed / merged / 3
    got = delta(one("lines", base, fts, base=base_method, options=options, beta=0.6), base)
    for k in SHAPES:
        close(got[k], (alpha + 0.6 * DEPTH[k] / 3) * unscaled[k], atol=1e-4)


def test_lines_refuses_bad_options_naming_the_key():
    lines = methods.get("lines")
    cases = [
        ({"merge": "ties", "options": {"densty": 0.2}}, r"^options\.densty: unknown hyper-parameter of ties"),
        ({"merge": "ties", "options": {"density": 2.0}}, r"^options\.density: "),
        ({"merge": "consensus", "options": {"k": "two"}}, r"^options\.k: "),
        ({"options": {"scaling": 0.3}}, r"^options\.scaling: lines replaces"),
        ({"merge": "dare"}, r"^merge: 'dare' is not one of"),
        ({"options": [1]}, r"^options: expected a mapping"),
    ]
    for hp, pattern in cases:
        with pytest.raises(MergeflowError, match=pattern):
            lines.hyper(hp)
    # the nested prefix follows the caller's
    with pytest.raises(MergeflowError, match=r"^merge\.options\.density: "):
        lines.hyper({"merge": "ties", "options": {"density": -1}}, where="merge.")
    # the engine refuses it too (hyper runs before prepare reads anything)
    base = stack_model()

    with pytest.raises(MergeflowError, match=r"options\.densty"):
        merge_state_dicts(lines, base, [base], {"merge": "ties", "options": {"densty": 0.2}})
    checked = lines.hyper({"merge": "ties", "options": {"density": 0.3}})
    assert checked["options"] == {"density": 0.3, "scope": "tensor"}  # filled, the base's scaling left out
    assert lines.hyper(checked) == checked  # idempotent


def test_lines_needs_a_block_stack():
    base = {"w": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(MergeflowError, match="no block stack"):
        merge_state_dicts(methods.get("lines"), base, [{"w": torch.ones(3), "b": torch.ones(2)}])


# --------------------------------------------------------------------------- CABS


def ref_cabs_masks(taus, n, m, order):
    """Plain-Python reference: per block, candidates sorted by (-|tau|, index)."""
    flat = [t.reshape(-1).tolist() for t in taus]
    N = len(flat[0])
    claimed = [False] * N
    masks = [[False] * N for _ in taus]
    starts = list(range(0, N, m))
    for t in order:
        for s in starts:
            idx = list(range(s, min(s + m, N)))
            quota = n if len(idx) == m else n * len(idx) // m
            cand = sorted((i for i in idx if not claimed[i]), key=lambda i: (-abs(flat[t][i]), i))
            for i in cand[:quota]:
                masks[t][i] = True
        for i in range(N):
            claimed[i] = claimed[i] or masks[t][i]
    return [torch.tensor(mk).reshape(taus[0].shape) for mk in masks]


def test_cabs_hand_computed():
    # m = 4, n = 2 (density 0.5); 6 entries: one block of 4 and a tail of 2 with quota 2*2//4 = 1
    base = {"w": torch.zeros(6)}
    t1 = torch.tensor([4.0, -3.0, 2.0, 1.0, 1.0, 2.0])
    t2 = torch.tensor([5.0, 1.0, -2.0, 3.0, 7.0, 9.0])
    models = [{"w": t1}, {"w": t2}]
    # task 0 first: block |t1| = 4,3,2,1 -> 0,1; tail 1,2 -> 5. task 1 among 2,3 -> both; tail among 4 -> 4
    out = one("cabs", base, models, n=2, m=4)["w"]
    assert torch.equal(out, torch.tensor([4.0, -3.0, -2.0, 3.0, 7.0, 2.0]))
    assert torch.equal(one("cabs", base, models, density=0.5, m=4)["w"], out)
    # task 1 first: block |t2| = 5,1,2,3 -> 0,3; tail 7,9 -> 5. task 0 among 1,2 -> both; tail 4
    out = one("cabs", base, models, n=2, m=4, order=[1, 0])["w"]
    assert torch.equal(out, torch.tensor([5.0, -3.0, 2.0, 3.0, 1.0, 9.0]))
    # per-task lambdas, in task order
    out = one("cabs", base, models, n=2, m=4, scaling=[0.5, 2.0])["w"]
    assert torch.equal(out, torch.tensor([2.0, -1.5, -4.0, 6.0, 14.0, 1.0]))
    # equal magnitudes: the lower index wins
    out = one("cabs", {"w": torch.zeros(4)}, [{"w": torch.tensor([1.0, -1.0, 1.0, 1.0])}], n=2, m=4)["w"]
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "numel,n,m,T", [(64, 1, 4, 3), (70, 2, 8, 4), (33, 3, 16, 5), (5, 2, 8, 2), (1, 1, 2, 2), (200, 3, 4, 3)]
)
def test_cabs_masks_properties_and_reference(numel, n, m, T):
    g = torch.Generator().manual_seed(numel + n + m + T)
    taus = [torch.randn(numel, generator=g).round(decimals=1) for _ in range(T)]  # rounding makes ties
    order = list(reversed(range(T)))
    masks = mergeflow.methods.cabs.cabs_masks(taus, n, m, order)
    want = ref_cabs_masks(taus, n, m, order)
    for got, ref in zip(masks, want):
        assert torch.equal(got, ref)
    stacked = torch.stack(masks).int()
    assert int(stacked.sum(0).max()) <= 1  # disjoint
    full, r = divmod(numel, m)
    for t, mk in enumerate(masks):
        blocks = mk[: full * m].reshape(full, m).sum(1) if full else torch.zeros(0)
        assert bool((blocks <= n).all())  # at most n per block
        if T * n <= m:  # enough room: every task keeps exactly its quota
            assert int(mk.sum()) == full * n + n * r // m
        assert int(mk[full * m :].sum()) <= n * r // m
    if T * n > m:  # over-full: the later tasks in the order keep less, the first keeps its quota
        assert int(masks[order[0]].sum()) == full * n + n * r // m


def test_cabs_engine_matches_reference_merge():
    shapes = {"a": (5, 7), "b": (13,), "c": (2, 3, 4), "s": ()}
    base = stack_model(3, shapes)
    fts = finetunes(base, 3, seed=4)
    taus = [{k: f[k] - base[k] for k in base} for f in fts]
    lam = [0.5, 1.0, 1.5]
    out = delta(one("cabs", base, fts, n=3, m=8, order=[2, 0, 1], scaling=lam), base)
    for k in shapes:
        masks = ref_cabs_masks([t[k] for t in taus], 3, 8, [2, 0, 1])
        want = sum(l * t[k] * mk for l, t, mk in zip(lam, taus, masks))
        close(out[k], want)
    assert torch.equal(out["s"], torch.zeros(()))  # a 0-dim tensor: quota int(3/8 * 1) = 0


def test_cabs_default_quota_fits_every_task():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(512)}
    for T, per_block in ((2, 64), (3, 64), (8, 32)):
        fts = [{"w": torch.randn(512, generator=g)} for _ in range(T)]
        out = one("cabs", base, fts)["w"]
        kept = [int(((out == f["w"]) & (out != 0)).sum()) for f in fts]
        assert kept == [2 * per_block] * T


def test_cabs_refusals():
    cabs = methods.get("cabs")
    for hp, pattern in [
        ({"n": 5, "m": 4}, r"^n: 5 is more than m = 4"),
        ({"n": 1, "density": 0.5}, r"^n: give density or n"),
        ({"order": [0, 0]}, r"^order: \[0, 0\] must list distinct"),
        ({"order": 2}, r"^order: expected a list"),
        ({"density": 1.5}, r"^density: "),
        ({"m": 0}, r"^m: "),
    ]:
        with pytest.raises(MergeflowError, match=pattern):
            cabs.hyper(hp)
    base = {"w": torch.zeros(8)}
    fts = [{"w": torch.ones(8)}, {"w": torch.ones(8)}]
    with pytest.raises(MergeflowError, match=r"^order: \[0, 2\] is not an order of the 2 tasks"):
        merge_state_dicts(cabs, base, fts, {"order": [0, 2]})
    with pytest.raises(MergeflowError, match=r"^scaling: 3 values given for 2 tasks"):
        merge_state_dicts(cabs, base, fts, {"scaling": [1, 1, 1]})


# --------------------------------------------------------------------------- engine and CUDA


def _save(path, sd):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "pico"}))
    save_file(sd, str(path / "model.safetensors"))
    return path


def test_engine_runs_both_on_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(7)
    base = {
        "embed.weight": torch.randn(12, 8, generator=g).bfloat16(),
        **{f"layers.{i}.q.weight": torch.randn(8, 8, generator=g).bfloat16() for i in range(3)},
        "norm.weight": torch.ones(8),
        "position_ids": torch.arange(12),
    }
    fts = [
        {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    ck = Checkpoint(_save(tmp_path / "base", base))
    sources = [TaskVectors.from_model(ck, _save(tmp_path / f"ft{i}", sd)) for i, sd in enumerate(fts)]
    taus = [{k: f[k].float() - base[k].float() for k in base if base[k].is_floating_point()} for f in fts]
    # LiNeS over TIES from the checkpoints = from memory; factors alpha + beta l/2
    got = merge(methods.get("lines"), ck, sources, {"merge": "ties", "options": {"density": 0.5}, "alpha": 0.3, "beta": 0.6})[0]
    mem = merge_state_dicts(
        methods.get("lines"), base, fts, {"merge": "ties", "options": {"density": 0.5}, "alpha": 0.3, "beta": 0.6}
    )[0]
    unscaled = merge_state_dicts(methods.get("ties"), base, fts, {"density": 0.5, "scaling": 1.0})[0]
    assert torch.equal(got["position_ids"], base["position_ids"])
    for k, v in got.items():
        assert torch.equal(v, mem[k]), k
        if base[k].is_floating_point():
            lam = 0.3 + 0.6 * (int(k.split(".")[1]) / 2 if k.startswith("layers.") else 0)
            close(v - base[k].float(), lam * (unscaled[k] - base[k].float()), atol=1e-4)
    # CABS from the checkpoints
    got = merge(methods.get("cabs"), ck, sources, {"n": 2, "m": 8, "scaling": 1.2})[0]
    assert torch.equal(got["position_ids"], base["position_ids"])
    for k in taus[0]:
        masks = ref_cabs_masks([t[k] for t in taus], 2, 8, [0, 1, 2])
        close(got[k] - base[k].float(), 1.2 * sum(t[k] * mk for t, mk in zip(taus, masks)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    base = stack_model(5)
    fts = finetunes(base, 4, seed=6)
    for name, hp in [
        ("cabs", {"n": 3, "m": 8}),
        ("cabs", {}),
        ("lines", {"merge": "ties", "options": {"density": 0.3}}),
        ("lines", {"merge": "consensus"}),
        ("lines", {"beta": 0.8}),
    ]:
        cpu = one(name, base, fts, **hp)
        gpu = one(name, base, fts, device="cuda", **hp)
        for k in base:
            close(gpu[k], cpu[k], atol=1e-5)
    # CABS masks are exact on the device too
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(1000, generator=g).round(decimals=1) for _ in range(3)]
    cpu = mergeflow.methods.cabs.cabs_masks(taus, 5, 16, [1, 2, 0])
    gpu = mergeflow.methods.cabs.cabs_masks([t.cuda() for t in taus], 5, 16, [1, 2, 0])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
