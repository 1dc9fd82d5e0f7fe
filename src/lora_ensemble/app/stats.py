"""Intervals for `lora-ensemble compare`: over seeds (Student t) and over test samples (paired bootstrap).

Over seeds, for the values x_1..x_n of one metric (one per seed):

    mean ± t_{0.975, n-1} * s / sqrt(n),    s the sample std        (n = 1: no interval)

Over test samples, for two methods A and B evaluated on the same N test samples (seeds s = 1..S_A and 1..S_B,
probabilities p^A_s, p^B_s of shape (N, C), labels y), the paired bootstrap draws K index vectors
I_k ~ Uniform{0..N-1}^N (one generator seeded by `seed`) and computes

    d_k = mean_s stat(p^A_s[I_k], y[I_k]) - mean_s stat(p^B_s[I_k], y[I_k])

for stat in {nll, brier, ece}: the same samples for both methods, so what the test set's composition adds to
both cancels. The interval is the (2.5 %, 97.5 %) percentile of d_1..d_K; the point estimate d is the statistic
on the full test set. A difference is called real when its interval excludes 0.

    nll   = 1/N sum_i -log max(p_{i,y_i}, 1e-12)
    brier = 1/N sum_i sum_c (p_ic - 1[c = y_i])^2
    ece   = sum_b |sum_{i in b} (1[argmax p_i = y_i] - max_c p_ic)| / N    (15 equal-width bins (lo, hi] on the
            confidence, as `metrics.expected_calibration_error`)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

NLL_EPS = 1e-12
N_BINS = 15
STATISTICS = ("nll", "ece", "brier")
# t_{0.975, df} for df = 1..30 (beyond: 1.96 + 2.4 / df, within 0.002 of the exact value up to df = 200)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def seed_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t-interval) of `values`; half-width None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * s / math.sqrt(n)


def format_interval(values: Sequence[float], digits: int = 4, signed: bool = False) -> str:
    """`seed_interval` as text: "mean ± half-width" ("mean" alone for one value, "-" for none); `signed` writes
    the mean's sign always (differences: "+0.0120 ± 0.0300")."""
    if not values:
        return "-"
    mean, half = seed_interval(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if half is None else f"{text} ± {half:.{digits}f}"


def _per_sample(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The per-sample pieces of each statistic: nll_i, brier_i, and for ECE (bin_i, correct_i - conf_i)."""
    p = probs.to(torch.float64)
    y = labels.long()
    conf, pred = p.max(dim=-1)
    edges = torch.arange(N_BINS + 1, dtype=torch.float64) / N_BINS
    bins = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, N_BINS - 1)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return {"nll": -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(NLL_EPS)),
            "brier": ((p - onehot) ** 2).sum(dim=-1), "bin": bins, "gap": (pred == y).to(torch.float64) - conf}


def _statistic(name: str, parts: dict[str, Tensor], idx: Tensor) -> Tensor:
    """The statistic on each resample: idx (K, N) -> (K,)."""
    if name in ("nll", "brier"):
        return parts[name][idx].mean(dim=1)
    if name == "ece":
        k, n = idx.shape
        sums = torch.zeros(k, N_BINS, dtype=torch.float64).scatter_add_(1, parts["bin"][idx], parts["gap"][idx])
        return sums.abs().sum(dim=1) / n
    raise ValueError(f"unknown statistic {name!r}; known: {list(STATISTICS)}")


def paired_bootstrap(probs_a: Sequence[Tensor], probs_b: Sequence[Tensor], labels: Tensor,
                     statistics: Sequence[str] = STATISTICS, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, float]]:
    """{stat: {diff, low, high, real}} of mean_s stat(A) - mean_s stat(B) (see the module docstring).

    probs_a, probs_b: one (N, C) probability tensor per seed of each method, all on the same N samples in the
    same order; labels (N,). Deterministic given `seed`."""
    if not probs_a or not probs_b:
        raise ValueError("paired_bootstrap needs at least one seed of each method")
    n = int(labels.shape[0])
    for p in (*probs_a, *probs_b):
        if p.ndim != 2 or p.shape[0] != n:
            raise ValueError(f"every probability tensor must be (N={n}, C); got {tuple(p.shape)}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"n_boot must be >= 1 and level in (0, 1); got {n_boot}, {level}")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=generator)
    full = torch.arange(n)[None]
    parts_a = [_per_sample(p, labels) for p in probs_a]
    parts_b = [_per_sample(p, labels) for p in probs_b]
    out = {}
    for name in statistics:
        def diff(index: Tensor) -> Tensor:
            a = torch.stack([_statistic(name, parts, index) for parts in parts_a]).mean(0)
            b = torch.stack([_statistic(name, parts, index) for parts in parts_b]).mean(0)
            return a - b

        draws = diff(idx)
        low, high = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
        point = float(diff(full)[0])
        out[name] = {"diff": point, "low": float(low), "high": float(high),
                     "real": bool(float(low) > 0 or float(high) < 0)}
    return out
