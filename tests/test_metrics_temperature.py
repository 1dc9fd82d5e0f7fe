"""Post-hoc temperature scaling of ensembles: fit on validation logits, apply to member logits."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, logsumexp

from lora_ensemble.metrics import (
    TemperatureScaler,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    predictive,
)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def overconfident(m=4, n=2000, c=10, sharpen=3.0, seed=0):
    """Labels drawn from softmax(base) (calibrated at T = 1); members are sharpened, slightly perturbed copies."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, c)) * 1.5
    labels = np.minimum((softmax(base).cumsum(1) < rng.uniform(size=(n, 1))).sum(1), c - 1)  # inverse CDF
    member_logits = sharpen * (base[None] + 0.1 * rng.normal(size=(m, n, c)))
    return member_logits, labels


def ensemble_nll(member_logits, labels):
    return negative_log_likelihood(predictive(member_logits).probs, labels)


@pytest.mark.parametrize("mode", ["members", "ensemble"])
def test_temperature_scaling_lowers_the_nll_and_ece_of_an_overconfident_ensemble(mode):
    val_z, val_y = overconfident(seed=0)
    test_z, test_y = overconfident(seed=1)
    t = fit_temperature(val_z, val_y, mode=mode)
    assert 2.0 < t < 4.0  # the logits were sharpened 3x
    scaled_val = apply_temperature(val_z, t, mode=mode)
    assert ensemble_nll(scaled_val, val_y) < ensemble_nll(val_z, val_y) - 0.1
    scaled_test = apply_temperature(test_z, t, mode=mode)
    before = expected_calibration_error(predictive(test_z).probs, test_y)
    after = expected_calibration_error(predictive(scaled_test).probs, test_y)
    assert after < before / 2


def numpy_nll(z, y, t, mode):
    """Reference NLL in log space (scipy), so tiny temperatures do not underflow."""
    if mode == "members":
        logp = logsumexp(log_softmax(z / t, axis=-1), axis=0) - np.log(len(z))
    else:
        logp = log_softmax((logsumexp(log_softmax(z, axis=-1), axis=0) - np.log(len(z))) / t, axis=-1)
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("mode", ["members", "ensemble"])
def test_fitted_temperature_is_the_minimum_of_a_brute_force_search(mode):
    z, y = overconfident(m=3, n=500, seed=2)
    coarse = np.logspace(-2, 2, 401)
    t0 = coarse[int(np.argmin([numpy_nll(z, y, t, mode) for t in coarse]))]
    fine = np.linspace(t0 / 1.03, t0 * 1.03, 601)
    best = fine[int(np.argmin([numpy_nll(z, y, t, mode) for t in fine]))]
    assert fit_temperature(z, y, mode=mode) == pytest.approx(best, rel=1e-3)


def test_a_calibrated_single_model_keeps_a_temperature_near_one():
    z, y = overconfident(m=1, n=4000, sharpen=1.0, seed=3)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)


def test_apply_temperature_shapes_and_formulas():
    z, _ = overconfident(m=3, n=50, seed=4)
    np.testing.assert_allclose(apply_temperature(z, 2.0).numpy(), z / 2.0)
    ens = apply_temperature(torch.tensor(z, dtype=torch.float32), 2.0, mode="ensemble")
    assert ens.shape == (1, 50, 10) and ens.dtype == torch.float64
    np.testing.assert_allclose(ens[0].numpy(), np.log(softmax(z).mean(0)) / 2.0, atol=1e-5)
    at_one = apply_temperature(z, 1.0, mode="ensemble")
    np.testing.assert_allclose(predictive(at_one).probs.numpy(), softmax(z).mean(0), atol=1e-12)


def test_temperature_scaler_fits_then_transforms_deterministically():
    val_z, val_y = overconfident(m=2, n=300, seed=5)
    scaler = TemperatureScaler(mode="members")
    with pytest.raises(RuntimeError, match="before fit"):
        scaler.transform(val_z)
    assert scaler.fit(val_z, val_y) is scaler
    assert scaler.temperature == fit_temperature(val_z, val_y) and isinstance(scaler.temperature, float)
    np.testing.assert_allclose(scaler.transform(val_z).numpy(), val_z / scaler.temperature)
    assert "temperature=" in repr(scaler)


def test_bad_temperature_arguments_raise():
    z, y = overconfident(m=2, n=20, seed=6)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "hot"):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            apply_temperature(z, bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        fit_temperature(z, y, mode="logits")
    with pytest.raises(ValueError, match="mode must be one of"):
        TemperatureScaler(mode="both")
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, y, bounds=(10.0, 1.0))
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_temperature(z, np.full(20, 10))


def test_a_temperature_at_its_upper_bound_stays_within_it():
    from lora_ensemble.metrics import fit_temperature

    labels = torch.tensor([0, 1, 0, 1])
    logits = torch.tensor([[[5.0, -5.0], [5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0]]])  # half sure and wrong
    t = fit_temperature(logits, labels, bounds=(1e-2, 1e2))
    assert t <= 1e2
