"""Selective prediction: keep the most confident samples, measure the error rate among those kept.

``score`` is an **uncertainty** score ``(N,)`` (higher = less confident = rejected first), the same convention
as :func:`lora_ensemble.metrics.ood_scores`, so ``ood_scores(z)["mi"]`` can be passed as is. The default is
``-max_c p_c`` (negated max probability).

Ties: samples with equal scores cannot be separated by any threshold, so within a tie group the number of
errors kept is taken as its expectation under a uniformly random order (linear in the number kept). The
result is deterministic and does not depend on the input order.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from lora_ensemble.metrics._checks import check_labels, check_probs, check_scores


def risk_coverage(
    probs: Any, labels: Any, score: Any = None, *, from_logits: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve: ``coverage_k = k / N`` and ``risk_k = errors among the k kept / k``, ``k = 1..N``.

    Args:
        probs: ``(N, C)`` probabilities (logits with ``from_logits=True``).
        labels: ``(N,)`` integer labels.
        score: optional ``(N,)`` uncertainty score, higher = rejected first; default ``-max_c p_c``.

    Returns:
        ``(coverage, risk)``, two float64 numpy arrays of shape ``(N,)``, coverage increasing.
    """
    p = check_probs(probs, from_logits=from_logits)
    n = p.shape[0]
    y = check_labels(labels, n, p.shape[1], p.device)
    u = -p.max(dim=-1).values if score is None else check_scores(score, "score", n).to(p.device)
    errors = (p.argmax(dim=-1) != y).to(torch.float64)

    order = torch.sort(u, stable=True).indices
    u_sorted, err_sorted = u[order].cpu().numpy(), errors[order].cpu().numpy()
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])  # first index of each tie group
    sizes = np.diff(np.r_[starts, n])
    group_err = np.add.reduceat(err_sorted, starts)
    err_before = np.r_[0.0, np.cumsum(group_err)[:-1]]
    group = np.repeat(np.arange(len(starts)), sizes)
    k = np.arange(1, n + 1, dtype=np.float64)
    kept_err = err_before[group] + (k - starts[group]) * group_err[group] / sizes[group]
    return k / n, kept_err / k


def aurc(probs: Any, labels: Any, score: Any = None, *, from_logits: bool = False) -> float:
    """Area under the risk-coverage curve, ``AURC = 1/N Σ_k risk_k`` (Geifman et al., 2018). Lower is better."""
    _, risk = risk_coverage(probs, labels, score, from_logits=from_logits)
    return float(risk.mean())


def accuracy_at_coverage(
    probs: Any,
    labels: Any,
    score: Any = None,
    coverages: Iterable[float] = (0.5, 0.8, 0.9),
    *,
    from_logits: bool = False,
) -> dict[float, float]:
    """Accuracy ``1 - risk_k`` on the ``k = ⌈c · N⌉`` most confident samples, for each coverage ``c`` in (0, 1].

    Returns ``{c: accuracy}`` in the order given.
    """
    coverages = tuple(coverages)
    for c in coverages:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0:
            raise ValueError(f"coverages must be numbers in (0, 1], got {c!r}")
    _, risk = risk_coverage(probs, labels, score, from_logits=from_logits)
    n = risk.shape[0]
    return {c: float(1.0 - risk[min(max(math.ceil(c * n - 1e-9), 1), n) - 1]) for c in coverages}
