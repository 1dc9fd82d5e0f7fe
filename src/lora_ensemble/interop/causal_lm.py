"""Causal language models as ensemble members for classification and multiple choice.

Sequence classification: `CausalLMClassifier(causal_lm, num_labels)` pools the decoder's last hidden state
(B, T, H) at the last non-padding token (or by a masked mean) and applies a Linear head named `classifier`,
which `LoraEnsemble` replicates per member automatically:

    ens = LoraEnsemble(CausalLMClassifier(llama, num_labels=3), num_members=4)
    ens(input_ids=ids, attention_mask=mask)                     # (M, B, 3)

Verbalizer: `CausalLMVerbalizer(causal_lm, answer_ids)` reads the class logits from the LM's own next-token
logits at the last prompt position, one answer token per class (" A", " B", ..., see `answer_token_ids`); its LM
head is frozen and shared by all members (not a `classifier`, so nothing is replicated), members differ by their
adapters only:

    ens = LoraEnsemble(CausalLMVerbalizer(llama, answer_token_ids(tokenizer, [" A", " B"])), num_members=4)
    ens(input_ids=ids, attention_mask=mask)                     # (M, B, 2)

Multiple choice: `choice_log_likelihoods(ens, input_ids, attention_mask, choice_mask)` scores every choice by
its summed token log-likelihood under each member, (M, B, K), usable as member logits over the K choices, from
one (B*K, T) row per (question, choice). `CausalLMChoiceScorer(causal_lm, num_choices)` computes the same scores
as a classifier, (B, K) per member, from one packed row per question ([question][choice 0]...[choice K-1], each
choice attending to the question and to itself only), so the question runs once for all K choices and a shared
trunk / trunk cache work as for any classifier:

    ens = LoraEnsemble(CausalLMChoiceScorer(llama, num_choices=4), num_members=4)
    ens(input_ids=packed, segment_ids=segments)                 # (M, B, 4)
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


def pool_rows(h: Tensor, attention_mask: Tensor, pooling: str = "last") -> Tensor:
    """(N, H) pooled hidden states of h (N, T, H) under attention_mask (B, T), N = B or N = M*B.

    With a shared trunk (`LoraEnsembleConfig(share_trunk=True)`) the inputs keep their B rows while the hidden
    states have M*B member-major rows (row m*B + b is member m's sample b): the mask's rows then serve every
    member, `mask[row % B]`."""
    N, B = h.shape[0], attention_mask.shape[0]
    if N != B:
        if N % B:
            raise ValueError(f"{N} hidden-state rows do not split into members of the mask's {B} rows")
        attention_mask = attention_mask.repeat(N // B, 1)                     # (M*B, T) member-major
    if pooling == "last":
        return h[torch.arange(N, device=h.device), last_token_index(attention_mask)]
    w = attention_mask.to(h.dtype).unsqueeze(-1)                              # (N, T, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def answer_token_ids(tokenizer: Any, answers: list[str]) -> list[int]:
    """The one token id of every answer string (e.g. [" A", " B", " C", " D"]); ValueError naming an answer that
    is not exactly one token, or two answers that share one."""
    ids = []
    for answer in answers:
        pieces = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces) if hasattr(tokenizer, "convert_ids_to_tokens") else pieces
            raise ValueError(f"answer {answer!r} is {len(pieces)} tokens {shown} for this tokenizer; the verbalizer "
                             "needs exactly one token per class")
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {answers} map to the token ids {ids}, which are not all different")
    return ids


class CausalLMVerbalizer(nn.Module):
    """logits (B, C)[b, c] = lm_head(h[b, t_b])[answer_ids[c]], t_b the last non-padding position of row b:
    the causal LM's next-token logit of class c's answer token after the prompt, its other logits unused.

    Computed as h_last (B, H) @ W[answer_ids].T (+ bias[answer_ids]) with W the LM head's (V, H) weight, so the
    (B, T, V) vocabulary logits are never formed. The LM head is kept as `lm_head` (excluded from adapters and
    heads by `LoraEnsemble`), frozen and shared: members differ only by the adapters in `backbone`.
    """

    def __init__(self, causal_lm: nn.Module, answer_ids: list[int]):
        super().__init__()
        head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(causal_lm).__name__} has no linear LM head (get_output_embeddings()); the "
                             "verbalizer needs a causal LM")
        answer_ids = [int(i) for i in answer_ids]
        if not answer_ids or any(i < 0 or i >= head.out_features for i in answer_ids):
            raise ValueError(f"answer_ids {answer_ids} must be token ids in [0, {head.out_features})")
        self.backbone = _backbone_of(causal_lm)
        self.lm_head = head
        self.answer_ids = answer_ids          # a list, not a buffer: the state holds no copy of anything
        self.num_labels = len(answer_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        h = out if isinstance(out, Tensor) else out[0]                        # (N, T, H) last hidden state
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        pooled = pool_rows(h, attention_mask, "last")                         # (N, H)
        index = torch.tensor(self.answer_ids, device=pooled.device)
        weight = self.lm_head.weight.index_select(0, index)                   # (C, H)
        bias = self.lm_head.bias.index_select(0, index) if self.lm_head.bias is not None else None
        return nn.functional.linear(pooled, weight, bias)                     # (N, C)


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
        return self.classifier(pool_rows(h, attention_mask, self.pooling))  # (B, C); (M*B, C) with a shared trunk


CHOICE_SCORES = ("sum", "mean")


def packed_positions(segment_ids: Tensor) -> Tensor:
    """(N, L) position ids of packed multiple-choice rows: the question's tokens 0..q-1, every choice's tokens
    q, q+1, ... (each choice continues the question as if it were alone), padding 0."""
    seg = segment_ids
    q_len = (seg == 0).sum(dim=1, keepdim=True)                                # (N, 1)
    positions = torch.where(seg == 0, torch.arange(seg.shape[1], device=seg.device).expand_as(seg), 0)
    for k in range(1, int(seg.max().item()) + 1 if seg.numel() else 1):
        inside = seg == k
        positions = torch.where(inside, q_len + inside.long().cumsum(dim=1) - 1, positions)
    return positions


def packed_attention(segment_ids: Tensor) -> Tensor:
    """(N, 1, L, L) boolean attention of packed rows: token i sees token j iff j <= i and j is a question token
    or a token of i's own choice (padding sees only itself, so no softmax row is empty)."""
    seg = segment_ids
    L = seg.shape[1]
    i = torch.arange(L, device=seg.device)
    causal = i.view(1, L, 1) >= i.view(1, 1, L)                                # (1, L, L): j <= i
    seg_i, seg_j = seg.unsqueeze(2), seg.unsqueeze(1)                          # (N, L, 1), (N, 1, L)
    allowed = causal & (seg_j >= 0) & (seg_i >= 0) & ((seg_j == 0) | (seg_j == seg_i))
    return (allowed | torch.eye(L, dtype=torch.bool, device=seg.device)).unsqueeze(1)


def mask_attention(backbone: nn.Module) -> str:
    """The attention implementation of a Hugging Face `backbone`: 'sdpa' (takes the packed mask as booleans) or
    'eager' (as an additive float mask); ValueError for any other (e.g. flash attention: no custom 4-D mask)."""
    attention = getattr(getattr(backbone, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"packed choice scoring needs eager or sdpa attention (a custom 4-D mask); the model uses "
                         f"{attention!r}")
    return attention


class CausalLMChoiceScorer(nn.Module):
    """logits (B, K)[b, k] = sum_t log p(c_bk[t] | question_b, c_bk[:t]): choice k's summed token log-likelihood
    given the question (divided by its number of tokens with `score="mean"`), read from one packed row per question.

    Input: `input_ids` (B, L) = [question tokens][choice 0's tokens]...[choice K-1's tokens][padding] and
    `segment_ids` (B, L) = 0 on the question, k + 1 on choice k's tokens, -1 on padding (as `ChoiceCollator`
    makes them). The backbone runs once per row with `packed_attention` (a choice's tokens see the question and
    their own earlier tokens, never another choice) and `packed_positions` (each choice's positions continue the
    question's), so every score equals the plain forward of `question + choice_k` alone. Choice token t of
    choice k is predicted from the hidden state of the token before it (the question's last token for t = 0);
    the LM head is applied at those positions only (never the (B, L, V) vocabulary logits). As in the
    verbalizer, `lm_head` is frozen and shared by the members; they differ by their adapters only.
    """

    def __init__(self, causal_lm: nn.Module, num_choices: int, score: str = "sum"):
        super().__init__()
        head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(causal_lm).__name__} has no linear LM head (get_output_embeddings()); choice "
                            "scoring needs a causal LM")
        if not isinstance(num_choices, int) or isinstance(num_choices, bool) or num_choices < 2:
            raise ValueError(f"num_choices must be an integer >= 2, got {num_choices!r}")
        if score not in CHOICE_SCORES:
            raise ValueError(f"score must be one of {list(CHOICE_SCORES)}, got {score!r}")
        self.backbone = _backbone_of(causal_lm)
        self.lm_head = head
        self.num_labels = self.num_choices = num_choices
        self.score = score
        mask_attention(self.backbone)  # an attention without custom 4-D masks is an error now, not at the first batch

    @property
    def attention(self) -> str:
        """The backbone's attention implementation now: 'sdpa' or 'eager' (see `mask_attention`)."""
        return mask_attention(self.backbone)

    def forward(self, input_ids: Tensor, segment_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or segment_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and segment_ids must both be (B, L), got {tuple(input_ids.shape)} and "
                             f"{tuple(segment_ids.shape)}")
        seg = segment_ids.long()
        if int(seg.max()) > self.num_choices or ((seg[:, 0] != 0) & (seg[:, 0] != -1)).any():
            raise ValueError(f"segment_ids must be 0 (question, first), 1..{self.num_choices} (choices) or -1 "
                             f"(padding); got values up to {int(seg.max())}")
        mask = packed_attention(seg)
        if self.attention == "eager":                                         # additive: 0 where allowed
            dtype = next(self.backbone.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        out = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=packed_positions(seg),
                            use_cache=False)
        h = out if isinstance(out, Tensor) else out[0]                        # (N, L, H), N = B or M*B
        N, B = h.shape[0], seg.shape[0]
        if N != B:                                                            # a shared trunk: member-major rows
            if N % B:
                raise ValueError(f"{N} hidden-state rows do not split into members of the input's {B} rows")
            seg, input_ids = seg.repeat(N // B, 1), input_ids.repeat(N // B, 1)
        L = seg.shape[1]
        q_len = (seg == 0).sum(dim=1)                                         # (N,)
        n_choice = (seg > 0).sum(dim=1)                                       # (N,) choice tokens per row
        P = int(n_choice.max())
        offsets = torch.arange(P, device=seg.device)
        where = (q_len.unsqueeze(1) + offsets).clamp_max(L - 1)               # (N, P): the choice tokens
        valid = offsets.unsqueeze(0) < n_choice.unsqueeze(1)                  # (N, P)
        which = seg.gather(1, where)                                          # (N, P): k + 1
        before = seg.gather(1, (where - 1).clamp_min(0))
        predictor = torch.where(before == which, where - 1, q_len.unsqueeze(1) - 1).clamp_min(0)  # (N, P)
        hp = h.gather(1, predictor.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (N, P, H)
        logp = self.lm_head(hp).float().log_softmax(dim=-1)                   # (N, P, V)
        token_ll = logp.gather(-1, input_ids.gather(1, where).unsqueeze(-1)).squeeze(-1) * valid
        index = torch.where(valid, which - 1, 0)
        ll = token_ll.new_zeros(N, self.num_choices).scatter_add_(1, index, token_ll)   # (N, K)
        counts = valid.float().new_zeros(N, self.num_choices).scatter_add_(1, index, valid.float())
        if (counts == 0).any():
            n, k = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"choice {k} of row {n % B} has no token in segment_ids (every row needs "
                             f"{self.num_choices} non-empty choices)")
        return ll / counts if self.score == "mean" else ll


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
