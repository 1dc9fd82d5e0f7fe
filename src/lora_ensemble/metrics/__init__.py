"""Evaluation of ensembles from member logits ``(M, N, C)`` and labels ``(N,)``.

The ensemble predictive is the mean of member softmaxes, ``p̄ = 1/M Σ_m softmax(z_m)``; every ensemble metric
is computed from it (see :func:`predictive`). Inputs may be torch tensors or numpy arrays; computation is in
float64; scalar results are Python floats. Bad inputs raise ``ValueError`` naming the problem.
"""

from lora_ensemble.extras import require

require("train", "torchmetrics", "numpy", feature="the metrics (lora_ensemble.metrics)")


from lora_ensemble.metrics.calibration import (
    NLL_EPS,
    CalibrationBins,
    accuracy,
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    macro_f1,
    maximum_calibration_error,
    negative_log_likelihood,
)
from lora_ensemble.metrics.diversity import (
    diversity,
    error_correlation,
    member_metrics,
    pairwise_disagreement,
    pairwise_js,
    pairwise_kl,
)
from lora_ensemble.metrics.evaluate import evaluate
from lora_ensemble.metrics.ood import SCORE_NAMES, auroc, average_precision, fpr_at_tpr, ood_metrics, ood_scores
from lora_ensemble.metrics.predictive import Predictive, entropy, predictive
from lora_ensemble.metrics.selective import accuracy_at_coverage, aurc, risk_coverage
from lora_ensemble.metrics.temperature import TemperatureScaler, apply_temperature, fit_temperature

__all__ = [
    "NLL_EPS",
    "SCORE_NAMES",
    "CalibrationBins",
    "Predictive",
    "TemperatureScaler",
    "accuracy",
    "accuracy_at_coverage",
    "adaptive_calibration_error",
    "apply_temperature",
    "aurc",
    "auroc",
    "average_precision",
    "brier_score",
    "calibration_bins",
    "diversity",
    "entropy",
    "error_correlation",
    "evaluate",
    "expected_calibration_error",
    "fit_temperature",
    "fpr_at_tpr",
    "macro_f1",
    "maximum_calibration_error",
    "member_metrics",
    "negative_log_likelihood",
    "ood_metrics",
    "ood_scores",
    "pairwise_disagreement",
    "pairwise_js",
    "pairwise_kl",
    "predictive",
    "risk_coverage",
]
