"""The PEFT-like API around the core: return_dict / loss for loops that read `.loss`, unload(), parameter counts,
repr, and member(m) of BatchEnsemble."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lora_ensemble import LoraEnsemble, member_cross_entropy
from lora_ensemble.core.batch import MemberModule
from lora_ensemble.core.ensemble import MemberOutput
from lora_ensemble.methods import build_method
from tiny_models import NUM_LABELS, build, call

FAMILIES = ["bert", "gpt2_lm", "llama_cls", "timm_vit", "torchvision_vit", "plain"]


def test_return_dict_gives_the_models_output_with_member_logits_and_the_papers_loss():
    model, make_batch = build("bert")
    ens = LoraEnsemble(model, num_members=3, r=4, target_modules="qv", head="classifier")
    batch = make_batch(5, torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1, 0])
    out = ens(**batch, labels=labels, return_dict=True)
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert tuple(out.logits.shape) == (3, 5, NUM_LABELS)
    torch.testing.assert_close(out.logits, ens(**batch))
    torch.testing.assert_close(out.loss, member_cross_entropy(out.logits, labels))
    assert out["loss"] is out.loss and list(out.keys())[0] == "loss"  # Trainer reads outputs["loss"]
    out.loss.backward()
    grads = {n: p.grad for n, p in ens.member_parameters().items()}
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    assert ens(**batch, return_dict=True).loss is None                      # no labels: no loss
    assert torch.is_tensor(ens(**batch)) and torch.is_tensor(ens(**batch, labels=labels))  # the default stays


def test_return_dict_on_a_model_that_returns_a_tensor_is_a_member_output():
    model, make_batch = build("plain")
    ens = LoraEnsemble(model, num_members=2, r=2, target_modules="qv", head="fc")
    (x,) = make_batch(4, torch.Generator().manual_seed(0))
    out = ens(x, labels=torch.tensor([0, 1, 2, 0]), return_dict=True)
    assert isinstance(out, MemberOutput) and isinstance(out, dict) and list(out) == ["loss", "logits"]
    torch.testing.assert_close(out.logits, ens(x))
    assert out.loss.ndim == 0 and ens(x, return_dict=True).loss is None


def test_return_dict_refuses_a_loss_it_cannot_compute():
    model, make_batch = build("gpt2_lm")
    ens = LoraEnsemble(model, num_members=2, r=2)
    batch = make_batch(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="member logits \\(M, B, C\\)"):
        ens(**batch, labels=torch.zeros(2, dtype=torch.long), return_dict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_gives_back_the_original_model(family):
    model, make_batch = build(family)
    batch = make_batch(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = call(model, batch).clone()
    types = {n: type(m) for n, m in model.named_modules()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ens = LoraEnsemble(model, num_members=2, r=2, init_gain=1.0)
    with torch.no_grad():                                   # members that change the function
        for p in ens.member_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(call(ens, batch)[0], before)
    back = ens.unload()
    assert back is model
    assert {n: type(m) for n, m in back.named_modules()} == types
    assert not any(isinstance(m, MemberModule) for m in back.modules())
    assert {n: p.requires_grad for n, p in back.named_parameters()} == requires_grad
    assert set(back.state_dict()) == set(state)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(call(back, batch), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unloaded"):
        call(ens, batch)
    LoraEnsemble(back, num_members=2, r=2)                 # the model can be wrapped again


def test_unload_restores_torch_transformer_fast_paths():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model = nn.Sequential(encoder, nn.Linear(16, 3))
    nested = encoder.use_nested_tensor
    hooks = [dict(m._forward_pre_hooks) for m in encoder.layers]
    ens = LoraEnsemble(model, num_members=2, r=2, target_modules=["self_attn"], head="1")
    assert encoder.use_nested_tensor is False
    ens.unload()
    assert encoder.use_nested_tensor == nested
    assert [dict(m._forward_pre_hooks) for m in encoder.layers] == hooks


def test_print_trainable_parameters_in_pefts_words(capsys):
    model, _ = build("bert")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    ens = LoraEnsemble(model, num_members=3, r=4, target_modules="qv", head="classifier")
    trainable = sum(p.numel() for p in ens.member_parameters().values())
    assert ens.get_nb_trainable_parameters() == (trainable, total - head + trainable)
    ens.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert match and int(match[1].replace(",", "")) == trainable
    assert float(match[3]) == pytest.approx(100 * trainable / (total - head + trainable), abs=1e-4)


def test_repr_says_members_rank_targets_and_head():
    model, _ = build("bert")
    ens = LoraEnsemble(model, num_members=3, r=4, target_modules="qv", head="classifier")
    text = repr(ens)
    assert text.startswith("LoraEnsemble(num_members=3, r=4,")
    assert "4 modules" in text and "bert.encoder.layer.*.attention.self.query" in text
    assert "head=['classifier']" in text and "BertForSequenceClassification" in text
    assert len(text) < 400


@pytest.mark.parametrize("family", ["bert", "timm_vit"])
def test_batch_ensemble_member_m_is_row_m_of_the_ensemble(family):
    model, make_batch = build(family)
    be = build_method("batch_ensemble", model, num_members=3).eval()
    batch = make_batch(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        member_logits = call(be, batch)
        for m in range(3):
            torch.testing.assert_close(call(be.member(m), batch), member_logits[m], rtol=1e-4, atol=1e-5)
