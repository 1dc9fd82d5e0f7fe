"""Diversity of ensemble members, and each member's own accuracy/NLL, from member logits ``(M, N, C)``.

All pairwise quantities are averaged over member pairs and samples; with one member there are no pairs and
every diversity value is 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_ensemble.metrics._checks import check_labels, check_member_logits
from lora_ensemble.metrics.predictive import pairwise_argmax_disagreement


def pairwise_disagreement(member_logits: Any) -> float:
    """Mean over pairs ``m < m'`` and samples of ``1[argmax z_m ≠ argmax z_m']``, in [0, 1]."""
    z = check_member_logits(member_logits)
    return float(pairwise_argmax_disagreement(z.argmax(dim=-1), z.shape[-1]).mean())


def pairwise_kl(member_logits: Any) -> float:
    """Mean over ordered pairs ``m ≠ m'`` and samples of ``KL(p_m || p_m') = Σ_c p_m,c (log p_m,c - log p_m',c)``.

    Natural log; computed from ``log_softmax`` so it is finite for finite logits.
    """
    z = check_member_logits(member_logits)
    m = z.shape[0]
    if m < 2:
        return 0.0
    logp = torch.log_softmax(z, dim=-1)  # (M, N, C)
    total = 0.0
    for a in range(m):  # (M, N, C) memory per step: row a against every member
        kl = (logp[a].exp() * (logp[a] - logp)).sum(dim=-1)  # (M, N), zero for the a-th row
        total += float(kl.sum())
    return total / (m * (m - 1) * z.shape[1])


def pairwise_js(member_logits: Any) -> float:
    """Mean over pairs ``m < m'`` and samples of the Jensen-Shannon divergence, in ``[0, log 2]`` nats.

    ``JS(p, q) = ½ KL(p || r) + ½ KL(q || r)`` with ``r = (p + q) / 2``.
    """
    z = check_member_logits(member_logits)
    m = z.shape[0]
    if m < 2:
        return 0.0
    logp = torch.log_softmax(z, dim=-1)
    total = 0.0
    for a in range(m):
        for b in range(a + 1, m):
            logr = torch.logaddexp(logp[a], logp[b]) - math.log(2.0)
            js = 0.5 * (logp[a].exp() * (logp[a] - logr) + logp[b].exp() * (logp[b] - logr)).sum(dim=-1)
            total += float(js.sum())
    return total / (m * (m - 1) / 2 * z.shape[1])


def error_correlation(member_logits: Any, labels: Any) -> float:
    """Mean over pairs ``m < m'`` of the Pearson correlation of the 0/1 error vectors ``e_m = 1[argmax z_m ≠ y]``.

    ``corr = cov(e_m, e_m') / (std(e_m) std(e_m'))``. When a member's errors are constant (it makes no error,
    or errs everywhere) the correlation is undefined; such a pair counts as 0 (no shared error pattern).
    """
    z = check_member_logits(member_logits)
    m, n, c = z.shape
    y = check_labels(labels, n, c, z.device)
    if m < 2:
        return 0.0
    e = (z.argmax(dim=-1) != y).to(torch.float64)  # (M, N)
    e = e - e.mean(dim=1, keepdim=True)
    cov = e @ e.T / n
    std = cov.diagonal().sqrt()
    denom = std[:, None] * std[None, :]
    corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    iu = torch.triu_indices(m, m, offset=1, device=z.device)
    return float(corr[iu[0], iu[1]].mean())


def member_metrics(member_logits: Any, labels: Any) -> dict[str, list[float]]:
    """Each member's own accuracy and NLL: ``{"acc": [M floats], "nll": [M floats]}``.

    ``nll_m = -1/N Σ_i log softmax(z_m,i)_{y_i}`` (from logits, no clamp); accuracy uses ``argmax z_m``.
    """
    z = check_member_logits(member_logits)
    m, n, c = z.shape
    y = check_labels(labels, n, c, z.device)
    acc = (z.argmax(dim=-1) == y).to(torch.float64).mean(dim=1)
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(2, y.expand(m, n)[..., None]).squeeze(-1).mean(dim=1)
    return {"acc": [float(v) for v in acc], "nll": [float(v) for v in nll]}


def diversity(member_logits: Any, labels: Any) -> dict[str, float]:
    """``{"disagreement", "kl", "js", "error_corr"}``: the four pairwise diversity measures of this module."""
    z = check_member_logits(member_logits)
    return {
        "disagreement": pairwise_disagreement(z),
        "kl": pairwise_kl(z),
        "js": pairwise_js(z),
        "error_corr": error_correlation(z, labels),
    }
