"""Causal language models as ensemble members for classification and multiple choice.

Sequence classification: `CausalLMClassifier(causal_lm, num_labels)` pools the decoder's last hidden state
(B, T, H) at the last non-padding token (or by a masked mean) and applies a Linear head named `classifier`,
which `LoraEnsemble` replicates per member automatically:

    ens = LoraEnsemble(CausalLMClassifier(llama, num_labels=3), num_members=4)
    ens(input_ids=ids, attention_mask=mask)                     # (M, B, 3)

Multiple choice: `choice_log_likelihoods(ens, input_ids, attention_mask, choice_mask)` scores every choice by
its summed token log-likelihood under each member, (M, B, K), usable as member logits over the K choices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

POOLINGS = ("last", "mean")


def _backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a Hugging Face causal LM (`model.base_model`, e.g. LlamaModel), or `model` itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else model


def _hidden_size(backbone: nn.Module) -> int:
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    config = getattr(backbone, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of {type(backbone).__name__}; pass hidden_size=")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B,) position of the last token with mask 1 in each row; right or left padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


class CausalLMClassifier(nn.Module):
    """logits (B, C) = classifier(pool(backbone(input_ids, attention_mask).last_hidden_state)).

    pool = "last": the hidden state of each row's last non-padding token (the only position that has seen the
    whole sequence in a causal model); "mean": the mean over non-padding tokens. The language-model head of a
    causal LM is dropped: only its decoder stack (`base_model`) is kept.
    """

    def __init__(self, causal_lm_or_backbone: nn.Module, num_labels: int, pooling: str = "last",
                 hidden_size: int | None = None, bias: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        self.backbone = _backbone_of(causal_lm_or_backbone)
        self.pooling, self.num_labels = pooling, num_labels
        hidden = hidden_size or _hidden_size(self.backbone)
        ref = next(self.backbone.parameters())
        self.classifier = nn.Linear(hidden, num_labels, bias=bias, device=ref.device, dtype=ref.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        h = out if isinstance(out, Tensor) else out[0]                      # (B, T, H) last hidden state
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), last_token_index(attention_mask)]
        else:
            w = attention_mask.to(h.dtype).unsqueeze(-1)                    # (B, T, 1)
            pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)                                      # (B, C)


def choice_log_likelihoods(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, choice_mask: Tensor,
                           normalize: bool = False, **model_kwargs: Any) -> Tensor:
    """Per-member, per-choice log-likelihood of the choice tokens: (M, B, K) (M = 1 for a plain model).

    Input layout, all (B, K, T): row [b, k] is the whole sequence `prompt_b + choice_bk` (padded to T, either
    side); `attention_mask` marks its real tokens; `choice_mask` marks the tokens of the choice (they must not
    be at position 0, which has no preceding token to predict it). The score is

        ll[m, b, k] = sum_t choice_mask[b, k, t] * log p_m(input_ids[b, k, t] | input_ids[b, k, :t])

    divided by the number of choice tokens when `normalize` is true. `model` is a `LoraEnsemble` of a causal LM
    (output (M, N, T, V)) or any causal LM (output (N, T, V) or `.logits`); `softmax(ll, -1)` over K is each
    member's predictive distribution over the choices.
    """
    if input_ids.dim() != 3 or attention_mask.shape != input_ids.shape or choice_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and choice_mask must all be (B, K, T), got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(choice_mask.shape)}"
        )
    choice = choice_mask.bool() & attention_mask.bool()
    if choice[..., 0].any():
        raise ValueError("choice_mask marks a token at position 0, which no preceding token predicts; start every "
                         "sequence with the prompt (or a BOS token)")
    counts = choice.sum(dim=-1)
    if (counts == 0).any():
        b, k = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"choice {k} of sample {b} has no token in choice_mask")
    B, K, T = input_ids.shape
    out = model(input_ids=input_ids.reshape(B * K, T), attention_mask=attention_mask.reshape(B * K, T), **model_kwargs)
    logits = out if isinstance(out, Tensor) else out.logits
    if logits.dim() == 3:                                                  # a plain model: one member
        logits = logits.unsqueeze(0)
    M = logits.shape[0]
    logp = logits[:, :, :-1].float().log_softmax(dim=-1)                  # (M, B*K, T-1, V): predicts tokens 1..T-1
    targets = input_ids.reshape(1, B * K, T, 1)[:, :, 1:].expand(M, -1, -1, -1)
    token_ll = logp.gather(-1, targets).squeeze(-1)                        # (M, B*K, T-1)
    mask = choice.reshape(1, B * K, T)[:, :, 1:].to(token_ll.dtype)
    ll = (token_ll * mask).sum(dim=-1).view(M, B, K)
    return ll / counts.to(ll.dtype) if normalize else ll
