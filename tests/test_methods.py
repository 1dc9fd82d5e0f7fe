"""The baseline methods behind one contract: build one by name, call it like the model, get member logits (M, B, C)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import NUM_LABELS, build, call
from torch import nn

from lora_ensemble.methods import METHODS, build_method
from lora_ensemble.methods.explicit import ExplicitEnsemble

M, B = 3, 4
OPTIONS = {  # small, fast settings; mc_dropout needs rates on timm models (they ship with dropout 0)
    "single": {}, "single_lora": {"r": 2}, "lora_ensemble": {"r": 2}, "explicit": {},
    "mc_dropout": {"dropout": 0.1, "attention_dropout": 0.1}, "snapshot": {}, "batch_ensemble": {},
}
FULL_FINE_TUNE = {"single", "explicit", "mc_dropout", "snapshot"}
PER_MEMBER_HEADS = {"lora_ensemble", "explicit", "batch_ensemble"}  # heads stacked (M, ...)
EVAL_MEMBERS = {"single": 1, "single_lora": 1, "snapshot": 1}  # snapshot: no cycle finished yet -> live weights
TRAIN_MEMBERS = {"single": 1, "single_lora": 1, "mc_dropout": 1, "snapshot": 1}  # one pass of the live network


def batch(make_batch, seed: int = 0, size: int = B):
    return make_batch(size, torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap falls back per op for SDPA on CPU
        yield


def test_unknown_method_or_option_lists_the_known_ones():
    model, _ = build("plain")
    with pytest.raises(ValueError, match="known methods: .*'batch_ensemble'.*'lora_ensemble'.*'snapshot'"):
        build_method("deep_ensemble", model)
    with pytest.raises(ValueError, match="unknown option.*'dropuot'.*accepts.*'dropout'"):
        build_method("mc_dropout", model, dropuot=0.1)
    with pytest.raises(ValueError, match="unknown option.*'rank'.*'r'"):
        build_method("lora_ensemble", model, rank=4)
    with pytest.raises(ValueError, match="unknown option.*'r'.*accepts.*'head_init'"):
        build_method("explicit", model, r=4)


@pytest.mark.parametrize("family", ["bert", "timm_vit"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_what_it_promises_and_returns_member_logits(name, family):
    model, make_batch = build(family)
    method = build_method(name, model, num_members=M, **OPTIONS[name])
    params = dict(method.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if name in FULL_FINE_TUNE:
        assert trainable == set(params), "a full fine-tune trains the whole backbone"
    else:
        frozen = set(params) - trainable
        assert frozen
        assert sum(params[n].numel() for n in trainable) < sum(params[n].numel() for n in frozen) / 2

    # one training step: every trainable parameter gets a gradient; every member head is reached
    method.train()
    out = call(method, batch(make_batch))
    assert out.shape == (TRAIN_MEMBERS.get(name, M), B, NUM_LABELS)
    out.float().logsumexp(-1).mean().backward()
    assert [n for n in trainable if params[n].grad is None] == []
    member_heads = {f"{head}.{n}": p for head in getattr(method, "head_names", [])
                    for n, p in method.model.get_submodule(head).named_parameters()
                    if p.requires_grad and p.dim() >= 1 and p.shape[0] == method.num_members > 1}
    assert bool(member_heads) == (name in PER_MEMBER_HEADS)
    for n, p in member_heads.items():
        assert all(p.grad[m].abs().sum() > 0 for m in range(method.num_members)), n
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed <= trainable
    backbone = next(n for n in params if "embed" in n and "weight" in n)  # word / patch embeddings
    assert (backbone in changed) == (name in FULL_FINE_TUNE)

    method.eval()
    with torch.no_grad():
        member_logits = call(method, batch(make_batch, seed=1))
    assert member_logits.shape == (EVAL_MEMBERS.get(name, M), B, NUM_LABELS)
    assert torch.isfinite(member_logits).all()
    assert method.num_members == (1 if name in ("single", "single_lora") else M)
    assert hasattr(method, "lr_lambda") == hasattr(method, "on_train_batch_end") == (name == "snapshot")


# ---- MC dropout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "timm_vit"])
def test_mc_dropout_members_differ_at_test_time_and_are_reproducible_under_a_seed(family):
    model, make_batch = build(family)
    method = build_method("mc_dropout", model, num_members=M, dropout=0.2, seed=5).eval()
    x = batch(make_batch)
    rng = torch.get_rng_state()
    with torch.no_grad():
        first, again = call(method, x), call(method, x)
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG is untouched"
    assert first.shape == (M, B, NUM_LABELS)
    assert (first[0] - first[1]).abs().max() > 1e-3
    assert torch.equal(first, again)
    method.seed = 6
    with torch.no_grad():
        assert not torch.allclose(call(method, x), first)
    assert not any(m.training for m in method.model.modules()), "the model's modules stay in eval mode"
    method.train()
    assert call(method, x).shape == (1, B, NUM_LABELS)  # one pass per training step


@pytest.mark.parametrize("family", ["bert", "timm_vit", "timm_swin"])
def test_mc_dropout_attention_dropout_alone_makes_members_differ(family):
    # transformers and timm apply attention dropout inside the attention kernel only when the attention
    # module is in training mode (timm Swin calls its nn.Dropout instead): both must be switched on at eval
    model, make_batch = build(family)
    method = build_method("mc_dropout", model, num_members=M, dropout=0.0, attention_dropout=0.5).eval()
    with torch.no_grad():
        out = call(method, batch(make_batch))
    assert (out[0] - out[1]).abs().max() > 1e-5
    if family == "bert":
        assert model.config.attention_probs_dropout_prob == 0.5 and model.config.hidden_dropout_prob == 0.0


def test_mc_dropout_with_lora_trains_only_the_adapters():
    model, make_batch = build("bert")
    method = build_method("mc_dropout", model, num_members=M, lora=True, r=2).eval()
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    with torch.no_grad():
        out = call(method, batch(make_batch))
    assert out.shape == (M, B, NUM_LABELS) and (out[0] - out[1]).abs().max() > 1e-4


def test_mc_dropout_refuses_a_model_without_dropout():
    with pytest.raises(ValueError, match="cannot run on TinyTransformer: it has no nn.Dropout module"):
        build_method("mc_dropout", build("plain")[0], dropout=0.1)
    with pytest.raises(ValueError, match="all have rate 0; pass dropout=0.1"):
        build_method("mc_dropout", build("timm_vit")[0])  # timm's default rates are 0


# ---- snapshot ---------------------------------------------------------------------------------------------
def test_snapshot_members_are_the_weights_at_the_end_of_each_cycle():
    model, make_batch = build("timm_vit")
    method = build_method("snapshot", model, num_members=M)
    total = 7  # cycles of 2, 2, 3 steps: snapshots after steps 1, 3, 6 (0-based)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, method.lr_lambda(total))
    lrs, at_cycle_end = [], []
    for step in range(total):
        method.train()
        lrs.append(opt.param_groups[0]["lr"] / 0.05)
        call(method, batch(make_batch, seed=step)).float().pow(2).mean().backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        method.on_train_batch_end(step, total)
        if step in (1, 3, 6):
            at_cycle_end.append(copy.deepcopy(method.model).eval())
        if step == 3:  # evaluation mid-training: the snapshots so far plus the live weights
            with torch.no_grad():
                assert call(method.eval(), batch(make_batch)).shape == (3, B, NUM_LABELS)

    assert lrs == pytest.approx([1, 0.5, 1, 0.5, 1, 0.75, 0.25])  # cosine restarts at every cycle
    x = batch(make_batch, seed=99)
    with torch.no_grad():
        members = call(method.eval(), x)
        expected = torch.stack([call(snap, x) for snap in at_cycle_end])
    assert members.shape == (M, B, NUM_LABELS)
    torch.testing.assert_close(members, expected, atol=1e-5, rtol=1e-4)
    assert (members[0] - members[1]).abs().max() > 1e-4 and (members[1] - members[2]).abs().max() > 1e-4

    # the snapshots travel with the state_dict
    state = method.state_dict()
    assert state["num_snapshots"] == M and state["snapshots.head.weight"].shape[0] == M
    fresh = build_method("snapshot", build("timm_vit", seed=1)[0], num_members=M)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(call(fresh.eval(), x), members)


def test_snapshot_refuses_fewer_steps_than_cycles():
    method = build_method("snapshot", build("plain")[0], num_members=M)
    with pytest.raises(ValueError, match="at least num_members=3 training steps"):
        method.lr_lambda(2)


# ---- explicit ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "timm_vit"])
def test_explicit_vmap_and_loop_agree_and_members_start_from_one_backbone(family):
    model, make_batch = build(family)
    ens = ExplicitEnsemble(model, num_members=M, vectorize=True).eval()
    x = batch(make_batch)
    with torch.no_grad():
        vectorized = call(ens, x)
        ens.call.vectorize = False
        looped = call(ens, x)
    torch.testing.assert_close(vectorized, looped, atol=1e-5, rtol=1e-4)
    assert (vectorized[0] - vectorized[1]).abs().max() > 1e-3, "heads are drawn independently"
    head = ens.model.get_submodule(ens.head_names[-1]).weight
    body = next(p for n, p in ens.model.named_parameters() if "embed" in n)
    assert not torch.equal(head[0], head[1]) and torch.equal(body[0], body[1])
    with torch.no_grad():
        torch.testing.assert_close(call(ens.member(2).eval(), x), looped[2], atol=1e-5, rtol=1e-4)


def test_explicit_members_train_independently_through_vmap():
    model, make_batch = build("bert")
    ens = ExplicitEnsemble(model, num_members=M, vectorize=True).train()
    call(ens, batch(make_batch))[1].pow(2).mean().backward()
    for n, p in ens.named_parameters():
        if p.grad is not None and p.grad[1].abs().sum() > 0:
            assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0, n
    assert ens.model.classifier.weight.grad[1].abs().sum() > 0


class DataDependent(nn.Module):
    """Python control flow on a weight-dependent value: torch.func.vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(5, 8), nn.Linear(8, NUM_LABELS)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h if h.sum() > 0 else -h)


def test_explicit_falls_back_to_a_loop_once_when_vmap_fails():
    torch.manual_seed(0)
    ens = ExplicitEnsemble(DataDependent(), num_members=M, head="fc").eval()
    x = torch.randn(B, 5)
    with pytest.warns(UserWarning, match="running the members in a loop"):
        out = ens(x)
    assert ens.call.vectorize is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ens(x), out)  # no second attempt, no second warning
    for m in range(M):
        torch.testing.assert_close(ens.member(m)(x), out[m])


# ---- BatchEnsemble ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "timm_vit"])
def test_batch_ensemble_with_unit_fast_weights_and_copied_heads_is_the_base_model(family):
    model, make_batch = build(family)
    base = copy.deepcopy(model)
    method = build_method("batch_ensemble", model, num_members=M, init="ones", head_init="copy").eval()
    x = batch(make_batch)
    with torch.no_grad():
        out, expected = call(method, x), call(base, x)
    for m in range(M):
        torch.testing.assert_close(out[m], expected, atol=1e-5, rtol=1e-4)
    per_block = {"bert": ["attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"],
                 "timm_vit": ["attn.qkv", "attn.proj"]}[family]       # qkvo; timm's fused qkv counts as one Linear
    blocks = {"bert": "bert.encoder.layer", "timm_vit": "blocks"}[family]
    assert method.target_names == [f"{blocks}.{i}.{name}" for i in range(2) for name in per_block]

    default = build_method("batch_ensemble", build(family)[0], num_members=M)
    r = default.model.get_submodule(default.target_names[0]).r
    assert abs(r.mean().item() - 1) < 0.05 and 0.05 < r.std().item() < 0.15  # N(1, 0.1^2)


@pytest.mark.parametrize("family, kind", [("torchvision_vit", "MultiheadAttention"), ("gpt2_lm", "Conv1D")])
def test_batch_ensemble_refuses_projections_that_are_not_linear(family, kind):
    with pytest.raises(ValueError, match=f"nn.Linear projections only.*{kind}"):
        build_method("batch_ensemble", build(family)[0], num_members=M)
