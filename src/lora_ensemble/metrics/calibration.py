"""Classification and calibration metrics on probabilities ``probs: (N, C)`` and labels ``(N,)``.

All functions take probabilities by default; pass ``from_logits=True`` to give logits ``(N, C)`` instead
(they are softmaxed in float64). For an ensemble, use ``predictive(member_logits).probs``.

Binning (ECE/MCE): ``n_bins`` equal-width bins on the top-label confidence ``conf_i = max_c p_ic``, bin ``b``
is ``(b/B, (b+1)/B]`` (closed on the right), and bins are weighted by their mass ``n_b / N``. This is written
by hand: ``torchmetrics``' ``multiclass_calibration_error`` uses ``[lo, hi)`` bins (``bucketize(right=True)``),
puts ``conf == 1`` into an extra bin of its own and casts confidences to float32, so results differ whenever
a confidence sits on a bin edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_stat_scores

from lora_ensemble.metrics._checks import as_float64, check_labels, check_n_bins, check_probs

#: Lower clamp on the true-class probability in :func:`negative_log_likelihood` (probability input only).
NLL_EPS = 1e-12


def _prepare(probs: Any, labels: Any, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = check_probs(probs, from_logits=from_logits)
    y = check_labels(labels, p.shape[0], p.shape[1], p.device)
    return p, y


def _class_counts(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-class integer ``[TP, FP, TN, FN, support]`` of the argmax predictions, shape ``(C, 5)``.

    Counting is torchmetrics' ``multiclass_stat_scores``; the ratios below are taken in float64 because
    torchmetrics' own accuracy/F1 divide in float32 (0.17 would come back as 0.17000000178813934).
    """
    return multiclass_stat_scores(p, y, num_classes=p.shape[1], average="none").to(torch.float64)


def accuracy(probs: Any, labels: Any, *, from_logits: bool = False) -> float:
    """Top-1 accuracy ``1/N Σ_i 1[argmax_c p_ic = y_i] = Σ_c TP_c / N``."""
    p, y = _prepare(probs, labels, from_logits)
    return float(_class_counts(p, y)[:, 0].sum() / p.shape[0])


def macro_f1(probs: Any, labels: Any, *, from_logits: bool = False) -> float:
    """Macro F1 of the argmax predictions: the unweighted mean of per-class ``F1_c = 2TP / (2TP + FP + FN)``.

    Classes that occur neither in ``labels`` nor in the predictions (``TP + FP + FN = 0``) are left out of the
    mean, as in torchmetrics' ``multiclass_f1_score(average="macro")`` and scikit-learn's default ``labels``.
    """
    p, y = _prepare(probs, labels, from_logits)
    tp, fp, _, fn, _ = _class_counts(p, y).unbind(dim=1)
    denom = 2 * tp + fp + fn
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())


@dataclass(frozen=True, eq=False)
class CalibrationBins:
    """Per-bin statistics of top-label confidence, each a float64 tensor of shape ``(B,)``.

    ``accuracy`` and ``confidence`` are 0 in empty bins (``count == 0``).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    count: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor


def calibration_bins(probs: Any, labels: Any, n_bins: int = 15, *, from_logits: bool = False) -> CalibrationBins:
    """Equal-width bins ``(b/B, (b+1)/B]`` on ``conf_i = max_c p_ic``: counts, mean accuracy, mean confidence."""
    n_bins = check_n_bins(n_bins)
    p, y = _prepare(probs, labels, from_logits)
    conf, pred = p.max(dim=-1)
    correct = (pred == y).to(torch.float64)
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=p.device) / n_bins
    # bucketize(right=False): edges[i-1] < x <= edges[i]; bin = i - 1 (x = 0 would give -1: put it in bin 0).
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).scatter_add_(0, idx, torch.ones_like(conf))
    acc_sum = torch.zeros_like(count).scatter_add_(0, idx, correct)
    conf_sum = torch.zeros_like(count).scatter_add_(0, idx, conf)
    safe = count.clamp_min(1.0)
    return CalibrationBins(edges[:-1], edges[1:], count, acc_sum / safe, conf_sum / safe)


def expected_calibration_error(
    probs: Any, labels: Any, n_bins: int = 15, norm: str = "l1", *, from_logits: bool = False
) -> float:
    """Top-label calibration error over equal-width bins ``(lo, hi]`` weighted by bin mass ``w_b = n_b / N``.

    ``norm="l1"``: ``ECE = Σ_b w_b |acc_b - conf_b|``; ``"l2"``: ``sqrt(Σ_b w_b (acc_b - conf_b)²)``;
    ``"max"``: ``MCE = max_{b: n_b > 0} |acc_b - conf_b|``. Range ``[0, 1]``.
    """
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be one of 'l1', 'l2', 'max', got {norm!r}")
    bins = calibration_bins(probs, labels, n_bins, from_logits=from_logits)
    gap = (bins.accuracy - bins.confidence).abs()
    weight = bins.count / bins.count.sum()
    if norm == "l1":
        return float((weight * gap).sum())
    if norm == "l2":
        return math.sqrt(float((weight * gap**2).sum()))
    return float(gap[bins.count > 0].max())


def maximum_calibration_error(probs: Any, labels: Any, n_bins: int = 15, *, from_logits: bool = False) -> float:
    """``MCE = max_{b: n_b > 0} |acc_b - conf_b|`` over the bins of :func:`expected_calibration_error`."""
    return expected_calibration_error(probs, labels, n_bins, norm="max", from_logits=from_logits)


def adaptive_calibration_error(probs: Any, labels: Any, n_bins: int = 15, *, from_logits: bool = False) -> float:
    """Top-label ECE over equal-mass bins: ``Σ_b (n_b / N) |acc_b - conf_b|``.

    Samples are sorted by confidence (stable sort, so ties keep input order) and split into ``n_bins``
    consecutive groups whose sizes differ by at most one (``numpy.array_split`` sizes; the first
    ``N mod B`` bins get one extra sample). When ``N < n_bins`` every sample is its own bin.
    """
    n_bins = check_n_bins(n_bins)
    p, y = _prepare(probs, labels, from_logits)
    conf, pred = p.max(dim=-1)
    correct = (pred == y).to(torch.float64)
    order = torch.sort(conf, stable=True).indices
    conf, correct = conf[order], correct[order]
    n = conf.shape[0]
    sizes = [n // n_bins + (1 if b < n % n_bins else 0) for b in range(n_bins)]
    total = 0.0
    for c_b, a_b in zip(torch.split(conf, sizes), torch.split(correct, sizes)):
        if c_b.numel():
            total += c_b.numel() / n * abs(float(a_b.mean()) - float(c_b.mean()))
    return total


def negative_log_likelihood(probs: Any, labels: Any, *, from_logits: bool = False) -> float:
    """Mean negative log-likelihood ``-1/N Σ_i log p_{i, y_i}`` in nats.

    Probability input: ``p_{i, y_i}`` is clamped below at ``NLL_EPS = 1e-12`` so a zero on the true class
    costs ``-log(1e-12) ≈ 27.6`` instead of ``inf``. Logit input (``from_logits=True``) uses ``log_softmax``
    and needs no clamp.
    """
    if from_logits:
        check_probs(probs, from_logits=True)  # shape, emptiness, finiteness
        z = as_float64(probs, "probs")
        y = check_labels(labels, z.shape[0], z.shape[1], z.device)
        return float(-torch.log_softmax(z, dim=-1).gather(1, y[:, None]).mean())
    p, y = _prepare(probs, labels, False)
    return float(-torch.log(p.gather(1, y[:, None]).clamp_min(NLL_EPS)).mean())


def brier_score(probs: Any, labels: Any, *, from_logits: bool = False) -> float:
    """Multiclass Brier score ``1/N Σ_i Σ_c (p_ic - 1[c = y_i])²``, range ``[0, 2]``."""
    p, y = _prepare(probs, labels, from_logits)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(dim=-1).mean())
