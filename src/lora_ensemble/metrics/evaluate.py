"""One call that computes every metric of :mod:`lora_ensemble.metrics` with stable, JSON-ready keys."""

from __future__ import annotations

from typing import Any

from lora_ensemble.metrics._checks import check_labels, check_member_logits, check_n_bins
from lora_ensemble.metrics.calibration import (
    accuracy,
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    macro_f1,
    maximum_calibration_error,
    negative_log_likelihood,
)
from lora_ensemble.metrics.diversity import diversity, member_metrics
from lora_ensemble.metrics.ood import SCORE_NAMES, ood_metrics, ood_scores
from lora_ensemble.metrics.predictive import predictive
from lora_ensemble.metrics.selective import accuracy_at_coverage, aurc


def evaluate(
    member_logits: Any, labels: Any, ood_member_logits: Any = None, n_bins: int = 15
) -> dict[str, float | list[float]]:
    """All metrics for member logits ``(M, N, C)`` and labels ``(N,)``; every value a Python float or list of floats.

    Ensemble metrics use the predictive ``p̄ = 1/M Σ_m softmax(z_m)``. Keys:

    - ``acc``, ``f1`` (macro), ``ece``, ``mce``, ``aece`` (``n_bins`` bins), ``nll``, ``brier``;
    - ``sc/aurc``, ``sc/acc@50``, ``sc/acc@80``, ``sc/acc@90`` (selective prediction by max probability);
    - ``div/disagreement``, ``div/kl``, ``div/js``, ``div/error_corr`` (0 when M = 1);
    - ``member/acc``, ``member/nll`` (lists of M), ``member/acc_mean``, ``member/nll_mean``;
    - ``unc/total``, ``unc/aleatoric``, ``unc/epistemic`` (means over samples);
    - with ``ood_member_logits`` ``(M, N_ood, C)``: ``ood/auroc_<s>``, ``ood/aupr_<s>``, ``ood/fpr95_<s>`` for
      ``s`` in ``msp``, ``entropy``, ``mi``, ``energy`` (OOD positive, higher score = more OOD).
    """
    n_bins = check_n_bins(n_bins)
    z = check_member_logits(member_logits)
    y = check_labels(labels, z.shape[1], z.shape[2], z.device)
    pred = predictive(z)
    p = pred.probs
    acc_at = accuracy_at_coverage(p, y, coverages=(0.5, 0.8, 0.9))
    members = member_metrics(z, y)
    out: dict[str, float | list[float]] = {
        "acc": accuracy(p, y),
        "f1": macro_f1(p, y),
        "ece": expected_calibration_error(p, y, n_bins),
        "mce": maximum_calibration_error(p, y, n_bins),
        "aece": adaptive_calibration_error(p, y, n_bins),
        "nll": negative_log_likelihood(p, y),
        "brier": brier_score(p, y),
        "sc/aurc": aurc(p, y),
        "sc/acc@50": acc_at[0.5],
        "sc/acc@80": acc_at[0.8],
        "sc/acc@90": acc_at[0.9],
    }
    out.update({f"div/{k}": v for k, v in diversity(z, y).items()})
    out.update(
        {
            "member/acc": members["acc"],
            "member/nll": members["nll"],
            "member/acc_mean": sum(members["acc"]) / len(members["acc"]),
            "member/nll_mean": sum(members["nll"]) / len(members["nll"]),
            "unc/total": float(pred.total.mean()),
            "unc/aleatoric": float(pred.aleatoric.mean()),
            "unc/epistemic": float(pred.epistemic.mean()),
        }
    )
    if ood_member_logits is not None:
        z_ood = check_member_logits(ood_member_logits, "ood_member_logits")
        if z_ood.shape[0] != z.shape[0] or z_ood.shape[2] != z.shape[2]:
            raise ValueError(
                f"ood_member_logits must have shape (M={z.shape[0]}, N_ood, C={z.shape[2]}) like member_logits, "
                f"got {tuple(z_ood.shape)}"
            )
        s_in, s_out = ood_scores(z), ood_scores(z_ood)
        for name in SCORE_NAMES:
            for key, value in ood_metrics(s_in[name], s_out[name]).items():
                out[f"ood/{key}_{name}"] = value
    return out
