"""evaluate(): every metric in one JSON-ready dict with stable keys."""

import json

import numpy as np
import pytest
import torch

from lora_ensemble.metrics import (
    aurc,
    diversity,
    evaluate,
    expected_calibration_error,
    negative_log_likelihood,
    ood_metrics,
    ood_scores,
    predictive,
)

BASE_KEYS = {
    "acc", "f1", "ece", "mce", "aece", "nll", "brier", "sc/aurc", "sc/acc@50", "sc/acc@80", "sc/acc@90",
    "div/disagreement", "div/kl", "div/js", "div/error_corr", "member/acc", "member/nll", "member/acc_mean",
    "member/nll_mean", "unc/total", "unc/aleatoric", "unc/epistemic",
}
OOD_KEYS = {f"ood/{m}_{s}" for m in ("auroc", "aupr", "fpr95") for s in ("msp", "entropy", "mi", "energy")}


def members(m=4, n=200, c=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(m, n, c)) + 2.0 * np.eye(c)[labels]  # better than chance
    return logits, labels


def test_evaluate_returns_every_key_as_plain_floats_and_survives_json():
    z, y = members()
    z_ood, _ = members(n=80, seed=1)
    result = evaluate(torch.tensor(z, dtype=torch.float32), torch.tensor(y), ood_member_logits=z_ood - 2.0)
    assert set(result) == BASE_KEYS | OOD_KEYS
    for key, value in result.items():
        if key in ("member/acc", "member/nll"):
            assert len(value) == 4 and all(type(v) is float for v in value), key
        else:
            assert type(value) is float, key
    assert json.loads(json.dumps(result)) == result


def test_evaluate_agrees_with_the_individual_metrics():
    z, y = members(seed=2)
    z_ood, _ = members(n=50, seed=3)
    result = evaluate(z, y, ood_member_logits=z_ood, n_bins=10)
    probs = predictive(z).probs
    assert result["ece"] == expected_calibration_error(probs, y, n_bins=10)
    assert result["nll"] == negative_log_likelihood(probs, y)
    assert result["sc/aurc"] == aurc(probs, y)
    assert result["div/js"] == diversity(z, y)["js"]
    assert result["acc"] == pytest.approx((probs.argmax(-1).numpy() == y).mean())
    assert result["member/acc_mean"] == pytest.approx(np.mean(result["member/acc"]))
    assert result["unc/total"] == pytest.approx(result["unc/aleatoric"] + result["unc/epistemic"])
    expected = ood_metrics(ood_scores(z)["mi"], ood_scores(z_ood)["mi"])
    assert result["ood/auroc_mi"] == expected["auroc"] and result["ood/fpr95_mi"] == expected["fpr95"]


def test_evaluate_with_a_single_member():
    z, y = members(m=1, seed=4)
    result = evaluate(z, y, ood_member_logits=members(m=1, n=30, seed=5)[0])
    assert result["unc/epistemic"] == 0.0
    assert all(result[k] == 0.0 for k in ("div/disagreement", "div/kl", "div/js", "div/error_corr"))
    assert result["ood/auroc_mi"] == 0.5  # all MI scores are 0: no separation
    assert result["member/acc"] == [result["acc"]]


def test_evaluate_refuses_mismatched_inputs():
    z, y = members()
    with pytest.raises(ValueError, match=r"labels must have shape \(200,\)"):
        evaluate(z, y[:-1])
    with pytest.raises(ValueError, match=r"ood_member_logits must have shape \(M=4, N_ood, C=6\)"):
        evaluate(z, y, ood_member_logits=np.zeros((3, 10, 6)))
    with pytest.raises(ValueError, match="n_bins"):
        evaluate(z, y, n_bins=-1)
