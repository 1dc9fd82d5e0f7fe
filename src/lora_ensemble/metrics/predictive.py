"""The ensemble predictive distribution and its per-sample uncertainty decomposition.

Choice: the ensemble predicts with the **mean of member softmaxes** (a mixture of the members' categorical
distributions), ``p̄(c | x) = 1/M Σ_m softmax(z_m(x))_c``, not the softmax of averaged logits. Every metric in
:mod:`lora_ensemble.metrics` (accuracy, ECE, NLL, Brier, selective prediction) is computed from this one ``p̄``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_ensemble.metrics._checks import check_member_logits


@dataclass(frozen=True, eq=False)
class Predictive:
    """Ensemble predictive distribution and uncertainty scores, all float64 tensors on the input's device.

    Attributes:
        member_probs: ``(M, N, C)`` member softmaxes ``p_m = softmax(z_m)``.
        probs: ``(N, C)`` predictive ``p̄ = 1/M Σ_m p_m``.
        total: ``(N,)`` predictive entropy ``H[p̄] = -Σ_c p̄_c log p̄_c`` (nats, ``0 log 0 = 0``).
        aleatoric: ``(N,)`` expected member entropy ``1/M Σ_m H[p_m]``.
        epistemic: ``(N,)`` mutual information ``total - aleatoric`` (≥ 0 by Jensen; round-off below 0 is set to 0).
        variance: ``(N,)`` total member variance ``Σ_c Var_m[p_m,c] = 1/M Σ_m ||p_m - p̄||²`` (0 when M = 1).
        disagreement: ``(N,)`` fraction of the ``M(M-1)/2`` member pairs whose ``argmax z_m`` differ (0 when M = 1).
    """

    member_probs: torch.Tensor
    probs: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    variance: torch.Tensor
    disagreement: torch.Tensor


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis: ``-Σ_c p_c log p_c`` with ``0 log 0 = 0``; shape ``(..., C) -> (...)``."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def pairwise_argmax_disagreement(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample fraction of member pairs ``m < m'`` that vote differently; votes ``(M, N)`` ints -> ``(N,)``.

    With ``k_c`` members voting for class ``c``, the number of agreeing pairs is ``Σ_c k_c (k_c - 1) / 2``.
    """
    m, n = votes.shape
    if m < 2:
        return torch.zeros(n, dtype=torch.float64, device=votes.device)
    counts = torch.zeros(n, num_classes, dtype=torch.float64, device=votes.device)
    counts.scatter_add_(1, votes.T, torch.ones(n, m, dtype=torch.float64, device=votes.device))
    agree = (counts * (counts - 1) / 2).sum(dim=-1)
    return 1.0 - agree / (m * (m - 1) / 2)


def predictive(member_logits: Any) -> Predictive:
    """Ensemble predictive and uncertainty decomposition from member logits ``(M, N, C)``.

    ``total = aleatoric + epistemic``: ``H[p̄] = E_m H[p_m] + I(y; m | x)`` (mutual information between the
    label and the member index). With one member, ``epistemic``, ``variance`` and ``disagreement`` are 0.

    Args:
        member_logits: ``(M, N, C)`` finite logits (torch tensor or numpy array). If you hold member
            probabilities instead, pass their log (``softmax(log p) = p``).

    Returns:
        A frozen :class:`Predictive`.
    """
    z = check_member_logits(member_logits)
    member_probs = torch.softmax(z, dim=-1)
    probs = member_probs.mean(dim=0)
    total = entropy(probs)
    aleatoric = entropy(member_probs).mean(dim=0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    variance = ((member_probs - probs) ** 2).sum(dim=-1).mean(dim=0)
    return Predictive(
        member_probs=member_probs,
        probs=probs,
        total=total,
        aleatoric=aleatoric,
        epistemic=epistemic,
        variance=variance,
        disagreement=pairwise_argmax_disagreement(z.argmax(dim=-1), z.shape[-1]),
    )
