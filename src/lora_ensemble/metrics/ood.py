"""Out-of-distribution detection: per-sample uncertainty scores and their detection metrics.

Convention everywhere: a **higher score means "more likely OOD"**, and OOD samples are the positive class.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_ensemble.metrics._checks import check_member_logits, check_scores
from lora_ensemble.metrics.predictive import predictive

SCORE_NAMES = ("msp", "entropy", "mi", "energy")


def ood_scores(member_logits: Any) -> dict[str, torch.Tensor]:
    """Uncertainty scores ``(N,)`` (float64) from member logits ``(M, N, C)``, higher = more likely OOD.

    - ``msp``: ``-max_c p̄_c``, the negated max softmax of the ensemble predictive ``p̄ = 1/M Σ_m softmax(z_m)``.
    - ``entropy``: predictive entropy ``H[p̄]``.
    - ``mi``: mutual information ``H[p̄] - 1/M Σ_m H[p_m]`` (0 for a single member).
    - ``energy``: ``-log Σ_c exp(z̄_c)`` with member-averaged logits ``z̄ = 1/M Σ_m z_m`` (the energy score of
      Liu et al., 2020, at temperature 1). Unlike the other scores it is not invariant to a per-member constant
      shift of the logits; for ``apply_temperature(..., mode="ensemble")`` outputs ``z̄ = log p̄ / T`` it is
      constant at ``T = 1``.
    """
    z = check_member_logits(member_logits)
    pred = predictive(z)
    return {
        "msp": -pred.probs.max(dim=-1).values,
        "entropy": pred.total,
        "mi": pred.epistemic,
        "energy": -torch.logsumexp(z.mean(dim=0), dim=-1),
    }


def _tie_groups(score_in: torch.Tensor, score_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of in-distribution and OOD samples per distinct score value, sorted by score ascending: ``(G,)`` each."""
    both = torch.cat([score_in, score_out.to(score_in.device)])
    values, inverse = torch.unique(both, sorted=True, return_inverse=True)
    is_out = torch.cat([torch.zeros_like(score_in), torch.ones_like(score_out).to(score_in.device)])
    n_out = torch.zeros_like(values).scatter_add_(0, inverse, is_out)
    n_in = torch.zeros_like(values).scatter_add_(0, inverse, 1.0 - is_out)
    return n_in, n_out


def auroc(score_in: Any, score_out: Any) -> float:
    """``AUROC = P(s_out > s_in) + ½ P(s_out = s_in)`` over all in/OOD pairs (Mann-Whitney; exact with ties)."""
    n_in, n_out = _tie_groups(check_scores(score_in, "score_in"), check_scores(score_out, "score_out"))
    in_below = torch.cumsum(n_in, 0) - n_in  # in-distribution samples with a strictly lower score
    wins = (n_out * (in_below + 0.5 * n_in)).sum()
    return float(wins / (n_in.sum() * n_out.sum()))


def average_precision(score_in: Any, score_out: Any) -> float:
    """Average precision with OOD positive: ``AP = Σ_t (R_t - R_{t-1}) P_t`` over thresholds ``t`` at the distinct
    scores, flagging ``score >= t`` (step-wise, no interpolation; as scikit-learn's ``average_precision_score``)."""
    n_in, n_out = _tie_groups(check_scores(score_in, "score_in"), check_scores(score_out, "score_out"))
    n_in, n_out = n_in.flip(0), n_out.flip(0)  # descending thresholds
    tp, flagged = torch.cumsum(n_out, 0), torch.cumsum(n_in + n_out, 0)
    return float((n_out / n_out.sum() * tp / flagged).sum())


def fpr_at_tpr(score_in: Any, score_out: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the largest threshold whose true-positive rate reaches ``tpr``.

    Flag OOD when ``score >= t``. With ``k = ⌈tpr · N_out⌉`` and ``t`` the ``k``-th largest OOD score,
    ``FPR = 1/N_in Σ_i 1[score_in_i >= t]`` (the lowest FPR among thresholds with TPR ≥ ``tpr``).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    s_in = check_scores(score_in, "score_in")
    s_out = check_scores(score_out, "score_out")
    n_out = s_out.shape[0]
    k = min(max(math.ceil(tpr * n_out - 1e-9), 1), n_out)
    threshold = torch.sort(s_out, descending=True).values[k - 1]
    return float((s_in >= threshold.to(s_in.device)).to(torch.float64).mean())


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float]:
    """Detection metrics for in-distribution scores ``(N_in,)`` vs. OOD scores ``(N_out,)``; OOD is positive.

    Returns ``{"auroc", "aupr", "fpr95"}``: :func:`auroc`, :func:`average_precision` (OOD positive) and
    :func:`fpr_at_tpr` at 95 % TPR. Both score sets must be non-empty (an AUROC needs both classes).

    Written by hand in float64: torchmetrics' ``binary_auroc``/``binary_average_precision`` give the same values
    but accumulate in float32 and squash scores outside [0, 1] with a sigmoid (merging large scores into ties).
    """
    s_in = check_scores(score_in, "score_in")
    s_out = check_scores(score_out, "score_out")
    return {"auroc": auroc(s_in, s_out), "aupr": average_precision(s_in, s_out), "fpr95": fpr_at_tpr(s_in, s_out)}
