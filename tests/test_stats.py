"""compare's statistics: the t-interval over seeds and the paired bootstrap over test samples."""

from __future__ import annotations

import math

import pytest
import torch

from lora_ensemble.app.stats import paired_bootstrap, seed_interval, t_quantile_975
from lora_ensemble.metrics import brier_score, expected_calibration_error, negative_log_likelihood


def two_methods(n, seed):
    """Labels y ~ U{0,1,2}; A puts p_y ~ U(0.5, 0.9) on the true class, B p_y ~ U(0.3, 0.7), the rest split evenly.
    True NLL difference: E[-log U(0.5,0.9)] - E[-log U(0.3,0.7)]; true Brier difference: see `expected`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)

    def probs(low, high):
        py = low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)
        p = ((1 - py) / 2)[:, None].repeat(1, 3)
        p[torch.arange(n), y] = py
        return p

    return probs(0.5, 0.9), probs(0.3, 0.7), y


def mean_neg_log(low, high):  # E[-log U] for U ~ Uniform(low, high)
    f = lambda x: x * math.log(x) - x  # noqa: E731 - antiderivative of log x
    return -(f(high) - f(low)) / (high - low)


def mean_brier(low, high):  # E[(1 - U)^2 + 2 ((1 - U) / 2)^2] = 1.5 E[(1 - U)^2]
    f = lambda x: -((1 - x) ** 3) / 3  # noqa: E731
    return 1.5 * (f(high) - f(low)) / (high - low)


def test_the_paired_interval_contains_the_true_difference_and_is_deterministic():
    a, b, y = two_methods(2000, seed=0)
    result = paired_bootstrap([a], [b], y, n_boot=1000, seed=3)
    expected = {"nll": mean_neg_log(0.5, 0.9) - mean_neg_log(0.3, 0.7), "brier": mean_brier(0.5, 0.9) - mean_brier(0.3, 0.7)}
    for stat, truth in expected.items():
        r = result[stat]
        assert r["low"] < truth < r["high"], (stat, truth, r)
        assert r["real"] and r["high"] < 0          # A is better by a margin the test set resolves
        assert r["high"] - r["low"] < 0.1 * abs(truth)
    assert paired_bootstrap([a], [b], y, n_boot=1000, seed=3) == result
    assert paired_bootstrap([a], [b], y, n_boot=1000, seed=4) != result


def test_the_point_estimates_are_the_metrics_of_the_full_test_set():
    a, b, y = two_methods(300, seed=1)
    r = paired_bootstrap([a, b], [b], y, n_boot=50)
    for stat, fn in (("nll", negative_log_likelihood), ("brier", brier_score), ("ece", expected_calibration_error)):
        truth = (fn(a, y) + fn(b, y)) / 2 - fn(b, y)  # A's side averages its two seeds
        assert r[stat]["diff"] == pytest.approx(truth, abs=1e-12)


def test_no_difference_is_not_called_real():
    a, _, y = two_methods(500, seed=2)
    r = paired_bootstrap([a], [a.clone()], y, n_boot=200)
    assert all(v["diff"] == 0 and v["low"] == 0 and v["high"] == 0 and not v["real"] for v in r.values())


def test_seed_interval_is_the_student_t_interval():
    mean, half = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert seed_interval([5.0]) == (5.0, None)
    assert t_quantile_975(1) == 12.706 and t_quantile_975(60) == pytest.approx(2.000, abs=0.002)


def test_mismatched_test_sets_are_refused():
    a, b, y = two_methods(10, seed=0)
    with pytest.raises(ValueError, match=r"\(N=10, C\)"):
        paired_bootstrap([a], [b[:5]], y)


def test_format_interval_writes_the_mean_and_the_t_half_width():
    from lora_ensemble.app.stats import format_interval

    assert format_interval([1.0, 2.0, 3.0], 3) == "2.000 ± 2.484"  # t_{0.975, 2} * 1 / sqrt(3)
    assert format_interval([1.5]) == "1.5000"
    assert format_interval([]) == "-"
    assert format_interval([0.01, 0.02, 0.03], signed=True) == "+0.0200 ± 0.0248"
    assert format_interval([-0.5], 2, signed=True) == "-0.50"
