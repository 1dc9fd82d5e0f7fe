"""Causal LMs (a tiny Llama) as classifiers and as multiple-choice scorers, one member at a time or all at once."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NUM_LABELS, VOCAB, build

from lora_ensemble import LoraEnsemble
from lora_ensemble.interop import CausalLMClassifier, choice_log_likelihoods

M = 3
ATOL = dict(atol=2e-5, rtol=1e-4)


def randomize_B(ens: LoraEnsemble) -> LoraEnsemble:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ens.member_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ens.eval()


def right_padded(batch_size: int = 4, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    for b, length in enumerate([7, 5, 3, 6][:batch_size]):
        mask[b, length:] = 0
    return ids, mask


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_causal_lm_classifier_pools_the_backbone_and_ensembles_like_any_classifier(pooling):
    llama = build("llama_lm")[0]
    clf = CausalLMClassifier(llama, num_labels=NUM_LABELS, pooling=pooling).eval()
    assert clf.backbone is llama.model and not hasattr(clf, "lm_head")
    ids, mask = right_padded()
    with torch.no_grad():
        h = llama.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "last":
            pooled = h[torch.arange(4), mask.sum(1) - 1]
        else:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(clf(ids, mask), clf.classifier(pooled))

    ens = randomize_B(LoraEnsemble(clf, num_members=M, r=2, init_gain=1.0))
    assert ens.head_names == ["classifier"]
    with torch.no_grad():
        out = ens(input_ids=ids, attention_mask=mask)
        assert out.shape == (M, 4, NUM_LABELS)
        for m in range(M):
            torch.testing.assert_close(ens.member(m).eval()(ids, mask), out[m], **ATOL)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_last_token_pooling_ignores_what_stands_in_the_padding():
    clf = CausalLMClassifier(build("llama_lm")[0], num_labels=NUM_LABELS).eval()
    ids, mask = right_padded()
    other = ids.clone()
    other[mask == 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(clf(ids, mask), clf(other, mask))


def choices_batch():
    """B=2 prompts, K=3 choices each; row [b, k] = prompt_b + choice_bk, right padded to T=7."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 3, 7), generator=g)
    mask = torch.zeros(2, 3, 7, dtype=torch.long)
    choice = torch.zeros(2, 3, 7, dtype=torch.long)
    prompt_len = [3, 2]
    choice_len = [[1, 2, 4], [3, 1, 2]]
    for b in range(2):
        for k in range(3):
            end = prompt_len[b] + choice_len[b][k]
            mask[b, k, :end] = 1
            choice[b, k, prompt_len[b]:end] = 1
    return ids, mask, choice


def test_choice_log_likelihoods_score_every_choice_under_every_member():
    ens = randomize_B(LoraEnsemble(build("llama_lm")[0], num_members=M, r=2, init_gain=1.0))
    ids, mask, choice = choices_batch()
    with torch.no_grad():
        ll = choice_log_likelihoods(ens, ids, mask, choice)
        assert ll.shape == (M, 2, 3) and (ll < 0).all()
        member = ens.member(1).eval()
        torch.testing.assert_close(choice_log_likelihoods(member, ids, mask, choice), ll[1:2], **ATOL)
        # by hand, sample 1 choice 0 (prompt of 2 tokens, choice of 3): sum_t log p(ids[t] | ids[:t]), t = 2, 3, 4
        logp = member(input_ids=ids[1, 0:1], attention_mask=mask[1, 0:1]).logits[0].log_softmax(-1)
        by_hand = sum(logp[t - 1, ids[1, 0, t]] for t in (2, 3, 4))
        torch.testing.assert_close(ll[1, 1, 0], by_hand, **ATOL)
        mean = choice_log_likelihoods(ens, ids, mask, choice, normalize=True)
        torch.testing.assert_close(mean, ll / choice.sum(-1))
    assert ll.softmax(-1).sum(-1).allclose(torch.ones(M, 2))    # member predictive distributions over the choices


def test_choice_layout_errors_are_explained():
    ens = LoraEnsemble(build("llama_lm")[0], num_members=2, r=2)
    ids, mask, choice = choices_batch()
    bad = choice.clone()
    bad[0, 0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        choice_log_likelihoods(ens, ids, mask, bad)
    empty = choice.clone()
    empty[1, 2] = 0
    with pytest.raises(ValueError, match="choice 2 of sample 1 has no token"):
        choice_log_likelihoods(ens, ids, mask, empty)
    with pytest.raises(ValueError, match=r"\(B, K, T\)"):
        choice_log_likelihoods(ens, ids[0], mask[0], choice[0])
