"""Post-hoc temperature scaling for ensembles, fitted by the NLL of the ensemble predictive.

Two modes, one temperature ``T > 0`` shared by all members:

- ``"members"``: every member's logits are divided by ``T`` before averaging probabilities,
  ``p̄_T = 1/M Σ_m softmax(z_m / T)``.
- ``"ensemble"``: ``T`` scales the log of the averaged probabilities, ``p̄_T = softmax(log p̄ / T)`` with
  ``p̄ = 1/M Σ_m softmax(z_m)``. :func:`apply_temperature` then returns ``log p̄ / T`` as a single "member",
  shape ``(1, N, C)``, so downstream code still receives member logits.

``T`` is found by minimizing ``NLL(T) = -1/N Σ_i log p̄_T(y_i | x_i)`` over ``log T`` in ``bounds``: a 41-point
grid, then golden-section search around the best grid point (deterministic; robust to the NLL of a mixture
not being convex in ``T``). If the minimum is at a bound (e.g. separable data drives ``T -> 0``), the bound is
returned.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_ensemble.metrics._checks import check_labels, check_member_logits

MODES = ("members", "ensemble")
_GRID = 41
_TOL = 1e-7  # golden-section stops when the log T bracket is this narrow
_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_temperature(temperature: Any) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError) as err:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}") from err
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _log_mean_softmax(z: torch.Tensor) -> torch.Tensor:
    """``log(1/M Σ_m softmax(z_m))`` computed stably; ``(M, N, C) -> (N, C)``."""
    return torch.logsumexp(torch.log_softmax(z, dim=-1), dim=0) - math.log(z.shape[0])


def _nll(z: torch.Tensor, y: torch.Tensor, t: float) -> float:
    """NLL of ``1/M Σ_m softmax(z_m / t)``; with ``z = log p̄[None]`` this is the ensemble-mode NLL."""
    return float(-_log_mean_softmax(z / t).gather(1, y[:, None]).mean())


def fit_temperature(
    member_logits: Any, labels: Any, mode: str = "members", bounds: tuple[float, float] = (1e-2, 1e2)
) -> float:
    """Temperature ``T`` in ``bounds`` minimizing the validation NLL of the ensemble predictive.

    Args:
        member_logits: ``(M, N, C)`` validation logits.
        labels: ``(N,)`` validation labels.
        mode: ``"members"`` (``z_m / T``) or ``"ensemble"`` (``log p̄ / T``).
        bounds: ``(T_min, T_max)`` with ``0 < T_min < T_max``.

    Returns:
        ``T`` as a Python float.
    """
    mode = _check_mode(mode)
    lo, hi = (_check_temperature(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max, got {bounds!r}")
    z = check_member_logits(member_logits)
    y = check_labels(labels, z.shape[1], z.shape[2], z.device)
    if mode == "ensemble":
        z = _log_mean_softmax(z)[None]  # one "member" log p̄: softmax(log p̄ / T) is the ensemble-mode predictive

    def f(s: float) -> float:
        return _nll(z, y, math.exp(s))

    a, b = math.log(lo), math.log(hi)
    grid = [a + (b - a) * i / (_GRID - 1) for i in range(_GRID)]
    values = [f(s) for s in grid]
    best = min(range(_GRID), key=values.__getitem__)  # first minimum: deterministic
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    c, d = right - _INVPHI * (right - left), left + _INVPHI * (right - left)
    fc, fd = f(c), f(d)
    while right - left > _TOL:
        if fc <= fd:
            right, d, fd = d, c, fc
            c = right - _INVPHI * (right - left)
            fc = f(c)
        else:
            left, c, fc = c, d, fd
            d = left + _INVPHI * (right - left)
            fd = f(d)
    candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
    return min(hi, max(lo, math.exp(min(candidates)[1])))  # exp(log(hi)) can round past hi


def apply_temperature(member_logits: Any, temperature: float, mode: str = "members") -> torch.Tensor:
    """Scaled member logits (float64): ``z / T`` with shape ``(M, N, C)`` for ``mode="members"``, or
    ``log(1/M Σ_m softmax(z_m)) / T`` with shape ``(1, N, C)`` for ``mode="ensemble"``."""
    mode = _check_mode(mode)
    t = _check_temperature(temperature)
    z = check_member_logits(member_logits)
    if mode == "members":
        return z / t
    return (_log_mean_softmax(z) / t)[None]


class TemperatureScaler:
    """Fit a shared temperature on validation member logits, then rescale any member logits.

    Example::

        scaler = TemperatureScaler(mode="members").fit(val_member_logits, val_labels)
        test_member_logits = scaler.transform(test_member_logits)
    """

    def __init__(self, mode: str = "members", bounds: tuple[float, float] = (1e-2, 1e2)) -> None:
        self.mode = _check_mode(mode)
        self.bounds = bounds
        self.temperature: float | None = None

    def fit(self, member_logits: Any, labels: Any) -> "TemperatureScaler":
        """Set ``self.temperature = fit_temperature(member_logits, labels, self.mode, self.bounds)``."""
        self.temperature = fit_temperature(member_logits, labels, self.mode, self.bounds)
        return self

    def transform(self, member_logits: Any) -> torch.Tensor:
        """``apply_temperature(member_logits, self.temperature, self.mode)``; call :meth:`fit` first."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaler.transform called before fit(); call fit(member_logits, labels)")
        return apply_temperature(member_logits, self.temperature, self.mode)

    def __repr__(self) -> str:
        return f"TemperatureScaler(mode={self.mode!r}, temperature={self.temperature!r})"
