"""Predictive decomposition, OOD scores/metrics, selective prediction and diversity from member logits (M, N, C)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lora_ensemble.metrics import (
    accuracy_at_coverage,
    aurc,
    diversity,
    error_correlation,
    member_metrics,
    ood_metrics,
    ood_scores,
    pairwise_disagreement,
    pairwise_js,
    pairwise_kl,
    predictive,
    risk_coverage,
)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entropy(p):
    return -(p * np.log(p)).sum(-1)


def members(m=4, n=300, c=5, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, n, c)) * scale, rng.integers(0, c, n)


def test_predictive_is_the_mean_of_member_softmaxes_with_entropy_decomposition():
    z, _ = members()
    pred = predictive(z)
    p_m = softmax(z)
    p = p_m.mean(0)
    np.testing.assert_allclose(pred.member_probs.numpy(), p_m, atol=1e-12)
    np.testing.assert_allclose(pred.probs.numpy(), p, atol=1e-12)
    np.testing.assert_allclose(pred.total.numpy(), entropy(p), atol=1e-12)
    np.testing.assert_allclose(pred.aleatoric.numpy(), entropy(p_m).mean(0), atol=1e-12)
    mi = np.mean([(p_m[i] * (np.log(p_m[i]) - np.log(p))).sum(-1) for i in range(4)], axis=0)  # E_m KL(p_m || p̄)
    np.testing.assert_allclose(pred.epistemic.numpy(), mi, atol=1e-10)
    np.testing.assert_allclose(pred.variance.numpy(), p_m.var(0).sum(-1), atol=1e-12)
    votes = z.argmax(-1)
    pairs = [(votes[a] != votes[b]) for a, b in itertools.combinations(range(4), 2)]
    np.testing.assert_allclose(pred.disagreement.numpy(), np.mean(pairs, axis=0), atol=1e-12)
    assert pred.probs.shape == (300, 5) and pred.total.dtype == torch.float64
    with pytest.raises(AttributeError):
        pred.probs = None  # frozen


def test_identical_members_have_no_epistemic_uncertainty_and_no_diversity():
    z, y = members(m=1)
    same = np.repeat(z, 3, axis=0)
    pred = predictive(same)
    assert pred.epistemic.abs().max() < 1e-12
    assert pred.variance.abs().max() < 1e-12 and pred.disagreement.abs().max() == 0
    np.testing.assert_allclose(pred.total.numpy(), pred.aleatoric.numpy(), atol=1e-12)
    div = diversity(same, y)
    assert div["disagreement"] == 0 and abs(div["kl"]) < 1e-12 and abs(div["js"]) < 1e-12
    assert div["error_corr"] == pytest.approx(1.0)  # identical error vectors


def test_a_single_member_works_and_has_zero_diversity():
    z, y = members(m=1)
    pred = predictive(z)
    assert pred.epistemic.abs().max() == 0 and pred.disagreement.abs().max() == 0
    assert diversity(z, y) == {"disagreement": 0.0, "kl": 0.0, "js": 0.0, "error_corr": 0.0}


def test_ood_scores_follow_their_definitions():
    z, _ = members(seed=1)
    s = ood_scores(torch.tensor(z))
    p = softmax(z).mean(0)
    np.testing.assert_allclose(s["msp"].numpy(), -p.max(-1), atol=1e-12)
    np.testing.assert_allclose(s["entropy"].numpy(), entropy(p), atol=1e-12)
    zbar = z.mean(0)
    np.testing.assert_allclose(s["energy"].numpy(), -np.log(np.exp(zbar).sum(-1)), atol=1e-12)
    np.testing.assert_allclose(s["mi"].numpy(), entropy(p) - entropy(softmax(z)).mean(0), atol=1e-12)
    assert (s["mi"] >= 0).all()


def hand_fpr95(s_in, s_out):
    target = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    fpr, tpr, _ = roc_curve(target, np.r_[s_in, s_out], drop_intermediate=False)
    return fpr[np.argmax(tpr >= 0.95)]


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_ood_metrics_match_sklearn(tied):
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(0, 1, 400), rng.normal(1, 1, 250)
    if tied:
        s_in, s_out = np.round(s_in), np.round(s_out)
    target = np.r_[np.zeros(400), np.ones(250)]
    result = ood_metrics(torch.tensor(s_in), s_out)
    assert result["auroc"] == pytest.approx(roc_auc_score(target, np.r_[s_in, s_out]), abs=1e-12)
    assert result["aupr"] == pytest.approx(average_precision_score(target, np.r_[s_in, s_out]), abs=1e-12)
    assert result["fpr95"] == pytest.approx(hand_fpr95(s_in, s_out), abs=1e-12)


def test_ood_metrics_of_separated_and_reversed_scores():
    assert ood_metrics([0.1, 0.2, 0.3], [5.0, 6.0]) == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    reversed_ = ood_metrics([5.0, 6.0], [0.1, 0.2, 0.3])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0
    assert ood_metrics([1e6, 2e6], [3e6, 4e6])["auroc"] == 1.0  # large scores are not squashed into ties


@pytest.mark.parametrize(
    "score_in, score_out, message",
    [
        ([], [1.0, 2.0], "score_in is empty"),
        ([1.0, 2.0], [], "score_out is empty"),
        ([1.0, np.nan], [1.0], "NaN/inf"),
        ([[1.0, 2.0]], [1.0], r"shape \(N,\)"),
    ],
)
def test_bad_ood_scores_raise(score_in, score_out, message):
    with pytest.raises(ValueError, match=message):
        ood_metrics(score_in, score_out)


def test_risk_coverage_matches_a_hand_computation_without_ties():
    z, y = members(m=1, n=200, seed=3)
    p = softmax(z[0])
    order = np.argsort(-p.max(1))
    errors = (p.argmax(1) != y)[order]
    expected = np.cumsum(errors) / np.arange(1, 201)
    coverage, risk = risk_coverage(p, y)
    np.testing.assert_allclose(coverage, np.arange(1, 201) / 200)
    np.testing.assert_allclose(risk, expected, atol=1e-12)
    assert aurc(p, y) == pytest.approx(expected.mean(), abs=1e-12)
    acc = accuracy_at_coverage(p, y, coverages=(0.5, 0.9))
    assert acc == {0.5: pytest.approx(1 - expected[99]), 0.9: pytest.approx(1 - expected[179])}


def test_risk_coverage_with_a_custom_uncertainty_score():
    z, y = members(m=3, n=150, seed=4)
    pred = predictive(z)
    by_default = risk_coverage(pred.probs, y)[1]
    np.testing.assert_allclose(risk_coverage(pred.probs, y, score=-pred.probs.max(-1).values)[1], by_default)
    order = np.argsort(pred.epistemic.numpy(), kind="stable")
    errors = (pred.probs.argmax(-1).numpy() != y)[order]
    np.testing.assert_allclose(risk_coverage(pred.probs, y, score=pred.epistemic)[1], np.cumsum(errors) / np.arange(1, 151))


def test_risk_coverage_breaks_ties_by_expectation_not_by_input_order():
    probs = np.tile([0.6, 0.4], (4, 1))
    labels = np.array([1, 0, 0, 0])  # one error among four equally confident samples
    _, risk = risk_coverage(probs, labels)
    np.testing.assert_allclose(risk, [0.25] * 4)
    _, risk_permuted = risk_coverage(probs, labels[::-1].copy())
    np.testing.assert_allclose(risk_permuted, risk)


def test_aurc_of_a_perfect_ranking():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1])  # only the least confident is wrong
    assert aurc(probs, labels) == pytest.approx(0.25 / 4)
    with pytest.raises(ValueError, match="coverages"):
        accuracy_at_coverage(probs, labels, coverages=(0.0,))
    with pytest.raises(ValueError, match=r"score must have shape \(4,\)"):
        risk_coverage(probs, labels, score=np.zeros(3))


def test_pairwise_divergences_match_hand_loops():
    z, y = members(m=3, n=100, seed=5)
    p = softmax(z)
    kl = np.mean([(p[a] * np.log(p[a] / p[b])).sum(-1).mean() for a, b in itertools.permutations(range(3), 2)])
    js = np.mean([(jensenshannon(p[a], p[b], axis=-1) ** 2).mean() for a, b in itertools.combinations(range(3), 2)])
    dis = np.mean([(z[a].argmax(-1) != z[b].argmax(-1)).mean() for a, b in itertools.combinations(range(3), 2)])
    assert pairwise_kl(z) == pytest.approx(kl, rel=1e-10)
    assert pairwise_js(z) == pytest.approx(js, rel=1e-8)
    assert pairwise_disagreement(z) == pytest.approx(dis, abs=1e-12)
    assert 0 < pairwise_js(z) <= np.log(2)


def test_error_correlation_matches_numpy_and_a_perfect_member_counts_as_zero():
    z, y = members(m=3, n=200, seed=6)
    errors = z.argmax(-1) != y
    corr = np.corrcoef(errors)
    assert error_correlation(z, y) == pytest.approx(np.mean([corr[0, 1], corr[0, 2], corr[1, 2]]), abs=1e-12)
    z[0] = np.eye(5)[y] * 10  # member 0 makes no errors: its pairs count as 0
    assert error_correlation(z, y) == pytest.approx(corr[1, 2] / 3, abs=1e-12)


def test_member_metrics_report_each_members_accuracy_and_nll():
    z, y = members(m=3, n=100, seed=7)
    result = member_metrics(z, y)
    p = softmax(z)
    assert result["acc"] == pytest.approx([(z[i].argmax(-1) == y).mean() for i in range(3)])
    assert result["nll"] == pytest.approx([-np.log(p[i][np.arange(100), y]).mean() for i in range(3)], rel=1e-10)


@pytest.mark.parametrize(
    "member_logits, message",
    [
        (np.zeros((10, 3)), r"\(M, N, C\).*leading member axis"),
        (np.zeros((2, 0, 3)), "empty"),
        (np.zeros((0, 4, 3)), "empty"),
        (np.full((2, 4, 3), np.inf), "NaN/inf"),
        (np.zeros((2, 4, 1)), "at least 2"),
    ],
)
def test_bad_member_logits_raise(member_logits, message):
    for fn in (predictive, ood_scores, pairwise_kl, pairwise_js, pairwise_disagreement):
        with pytest.raises(ValueError, match=message):
            fn(member_logits)
