"""Accuracy, F1, ECE/MCE/ACE, NLL and Brier on probabilities (N, C), checked against independent computations."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torchmetrics.functional.classification import multiclass_calibration_error

from lora_ensemble.metrics import (
    accuracy,
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    macro_f1,
    maximum_calibration_error,
    negative_log_likelihood,
)


def random_probs(n=500, c=7, seed=0, scale=2.0, p_right=0.6):
    """Random logits; the label is the argmax with probability ``p_right``, else uniform. Confidences spread over
    (1/C, 1), so low bins are under- and high bins overconfident: a wrong binning changes the ECE."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * scale
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.where(rng.uniform(size=n) < p_right, probs.argmax(1), rng.integers(0, c, n))
    return logits, probs, labels


def hand_ece(probs, labels, n_bins, norm="l1"):
    """Reference: equal-width bins (lo, hi] written as an explicit loop."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(float)
    total, gaps = 0.0, []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - conf[in_bin].mean())
            total += in_bin.mean() * gap
            gaps.append(gap)
    return max(gaps) if norm == "max" else total


def hand_ace(probs, labels, n_bins):
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    order = np.argsort(conf, kind="stable")
    return sum(
        len(i) / len(conf) * abs(correct[i].mean() - conf[i].mean()) for i in np.array_split(order, n_bins) if len(i)
    )


def test_accuracy_and_macro_f1_match_sklearn():
    _, probs, labels = random_probs()
    labels[labels == 6] = 5  # class 6 absent from labels, still predicted: counts as F1 = 0
    assert macro_f1(probs, labels) == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"), abs=1e-12)
    probs[:, 5] = 0.0
    probs /= probs.sum(1, keepdims=True)
    labels[labels == 5] = 4  # class 5 absent from labels and predictions: left out of the mean
    assert (probs.argmax(1) != 5).all()
    assert accuracy(probs, labels) == pytest.approx(accuracy_score(labels, probs.argmax(1)), abs=1e-12)
    assert macro_f1(probs, labels) == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"), abs=1e-12)


def test_accuracy_is_exact_in_float64_and_accepts_logits():
    logits, probs, labels = random_probs(n=100)
    expected = (probs.argmax(1) == labels).sum() / 100
    assert accuracy(torch.tensor(logits), torch.tensor(labels), from_logits=True) == expected


def test_ece_and_mce_match_a_hand_loop_with_right_closed_bins():
    _, probs, labels = random_probs(n=2000, seed=1)
    for n_bins in (5, 15):
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(hand_ece(probs, labels, n_bins), abs=1e-12)
        assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(
            hand_ece(probs, labels, n_bins, "max"), abs=1e-12
        )


def test_ece_agrees_with_torchmetrics_when_no_confidence_sits_on_a_bin_edge():
    _, probs, labels = random_probs(n=1000, seed=2)
    ours = expected_calibration_error(probs, labels, 15)
    theirs = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=7, n_bins=15)
    assert ours == pytest.approx(float(theirs), abs=1e-6)


def test_a_confidence_on_a_bin_edge_belongs_to_the_lower_bin():
    # conf 0.6 (right) and 0.5 (wrong) share the bin (0.4, 0.6]: |0.5 - 0.55| = 0.05.
    probs = np.array([[0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 1])
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.05, abs=1e-12)
    # conf 1.0 shares the last bin (14/15, 1] with 0.95.
    probs = np.array([[1.0, 0.0], [0.95, 0.05]])
    assert expected_calibration_error(probs, np.array([0, 1]), n_bins=15) == pytest.approx(0.475, abs=1e-12)
    bins = calibration_bins(probs, np.array([0, 1]), n_bins=15)
    assert bins.count.tolist() == [0.0] * 14 + [2.0]


def test_a_perfectly_calibrated_predictor_has_zero_ece_mce_and_ace():
    rows, labels = [], []
    for conf, others in ((0.5, (0.3, 0.2)), (0.7, (0.2, 0.1)), (0.9, (0.06, 0.04))):
        n_right = round(conf * 10)
        rows += [[conf, *others]] * 10
        labels += [0] * n_right + [1] * (10 - n_right)  # right exactly conf * 10 times out of 10
    probs, labels = np.array(rows), np.array(labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert adaptive_calibration_error(probs, labels, n_bins=3) == pytest.approx(0.0, abs=1e-12)


def test_sampled_calibrated_predictor_has_small_ece_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 20000)
    probs = np.stack([conf, 1 - conf], 1)
    labels = (rng.uniform(size=20000) > conf).astype(int)  # label 0 with probability conf
    assert expected_calibration_error(probs, labels) < 0.02
    sharp = np.stack([np.sqrt(conf), 1 - np.sqrt(conf)], 1)
    assert expected_calibration_error(sharp, labels) > 0.05


def test_adaptive_ece_uses_equal_mass_bins():
    _, probs, labels = random_probs(n=103, seed=4)
    assert adaptive_calibration_error(probs, labels, n_bins=10) == pytest.approx(hand_ace(probs, labels, 10), abs=1e-12)
    assert adaptive_calibration_error(probs[:5], labels[:5], n_bins=15) == pytest.approx(
        hand_ace(probs[:5], labels[:5], 5), abs=1e-12
    )


def test_nll_matches_numpy_and_clamps_a_zero_true_class_probability():
    logits, probs, labels = random_probs(seed=5)
    expected = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected, rel=1e-12)
    assert negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(expected, rel=1e-10)
    certain_and_wrong = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert negative_log_likelihood(certain_and_wrong, np.array([1, 0])) == pytest.approx(-math.log(1e-12) / 2)


def test_brier_score_of_known_predictors():
    labels = np.array([0, 1, 2, 3, 0])
    uniform = np.full((5, 4), 0.25)
    assert brier_score(uniform, labels) == pytest.approx(1 - 1 / 4)  # (1 - 1/C)^2 + (C - 1)/C^2
    constant = np.tile([0.7, 0.2, 0.1, 0.0], (5, 1))
    per_label = {0: 0.3**2 + 0.2**2 + 0.1**2, 1: 0.7**2 + 0.8**2 + 0.1**2, 2: 0.7**2 + 0.2**2 + 0.9**2, 3: 0.7**2 + 0.2**2 + 0.1**2 + 1}
    assert brier_score(constant, labels) == pytest.approx(np.mean([per_label[y] for y in labels]))
    onehot_wrong = np.eye(4)[(labels + 1) % 4]
    assert brier_score(onehot_wrong, labels) == pytest.approx(2.0)
    assert brier_score(np.eye(4)[labels], labels) == 0.0


def test_brier_matches_numpy_on_random_input():
    _, probs, labels = random_probs(seed=6)
    expected = ((probs - np.eye(7)[labels]) ** 2).sum(1).mean()
    assert brier_score(torch.tensor(probs, dtype=torch.float32), labels) == pytest.approx(expected, abs=1e-6)


ALL = [accuracy, macro_f1, expected_calibration_error, maximum_calibration_error, adaptive_calibration_error,
       negative_log_likelihood, brier_score]


@pytest.mark.parametrize("metric", ALL, ids=lambda f: f.__name__)
def test_logits_passed_as_probabilities_are_refused_with_a_hint(metric):
    logits, _, labels = random_probs(n=20)
    with pytest.raises(ValueError, match="from_logits=True"):
        metric(logits, labels)


@pytest.mark.parametrize("metric", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "probs, labels, message",
    [
        (np.array([[0.5, 0.5], [np.nan, 0.5]]), np.array([0, 1]), "NaN/inf"),
        (np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0, 2]), r"must lie in \[0, 1\]"),
        (np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0, -1]), "got -1"),
        (np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0, 1, 1]), r"shape \(2,\)"),
        (np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0.0, 1.0]), "integer"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.full((2, 2, 2), 0.5), np.array([0, 1]), r"shape \(N, C\)"),
        (np.ones((2, 1)), np.array([0, 0]), "at least 2"),
    ],
    ids=["nan", "label-too-big", "label-negative", "length-mismatch", "float-labels", "empty", "3d", "one-class"],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(metric, probs, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(probs, labels)


def test_bad_binning_arguments_are_refused():
    _, probs, labels = random_probs(n=10)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="norm"):
        expected_calibration_error(probs, labels, norm="l3")
