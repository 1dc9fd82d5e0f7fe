"""Input validation shared by the metrics: convert to float64 torch tensors and fail loudly.

Every public metric goes through these helpers, so a bad input raises the same ``ValueError`` everywhere:
it names the argument, the bad value, and what would be accepted. Nothing is clamped or repaired here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Rows of a probability matrix may deviate from summing to one by at most this much (float32 softmax rounding).
SUM_ATOL = 1e-4


def as_float64(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` (torch tensor, numpy array or nested list) as a float64 tensor, on ``x``'s device if a tensor."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a real floating/integer array, got dtype {x.dtype}")
        return x.detach().to(torch.float64)
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a torch tensor or numpy array of numbers, got {type(x).__name__}") from err
    return torch.from_numpy(arr)


def check_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s), first at index {first} "
            f"(value {x[first].item()}); all entries must be finite"
        )


def check_member_logits(member_logits: Any, name: str = "member_logits") -> torch.Tensor:
    """Validate member logits: finite, shape ``(M, N, C)`` with ``M >= 1``, ``N >= 1``, ``C >= 2``."""
    z = as_float64(member_logits, name)
    if z.ndim != 3:
        hint = "; add a leading member axis (logits[None]) for a single model" if z.ndim == 2 else ""
        raise ValueError(f"{name} must have shape (M, N, C), got {tuple(z.shape)}{hint}")
    m, n, c = z.shape
    if m < 1 or n < 1:
        raise ValueError(f"{name} is empty: shape {tuple(z.shape)} needs at least 1 member and 1 sample")
    if c < 2:
        raise ValueError(f"{name} has C = {c} classes; at least 2 are needed")
    check_finite(z, name)
    return z


def check_probs(probs: Any, name: str = "probs", from_logits: bool = False) -> torch.Tensor:
    """Return validated probabilities ``(N, C)``; with ``from_logits=True`` the input is logits and is softmaxed."""
    p = as_float64(probs, name)
    if p.ndim != 2:
        hint = "; for member outputs (M, N, C) use predictive(member_logits).probs" if p.ndim == 3 else ""
        raise ValueError(f"{name} must have shape (N, C), got {tuple(p.shape)}{hint}")
    n, c = p.shape
    if n < 1:
        raise ValueError(f"{name} is empty: shape {tuple(p.shape)} has no samples")
    if c < 2:
        raise ValueError(f"{name} has C = {c} classes; at least 2 are needed")
    check_finite(p, name)
    if from_logits:
        return torch.softmax(p, dim=-1)
    if bool((p < 0).any()) or bool((p > 1 + SUM_ATOL).any()):
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{p.min().item():.4g}, {p.max().item():.4g}]; "
            "pass from_logits=True if these are logits"
        )
    err = (p.sum(dim=-1) - 1).abs()
    if bool((err > SUM_ATOL).any()):
        row = int(err.argmax())
        raise ValueError(
            f"rows of {name} must sum to 1 (within {SUM_ATOL}), but row {row} sums to {p[row].sum().item():.6g}; "
            "pass from_logits=True if these are logits"
        )
    return p


def check_labels(labels: Any, n: int, c: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """Validate integer class labels: shape ``(N,)``, values in ``[0, C)``; returned as int64 on ``device``."""
    if isinstance(labels, torch.Tensor):
        y = labels.detach()
        integral = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    else:
        arr = np.asarray(labels)
        integral = np.issubdtype(arr.dtype, np.integer)
        y = torch.from_numpy(arr.astype(np.int64)) if integral else None
    if not integral:
        dtype = labels.dtype if hasattr(labels, "dtype") else type(labels).__name__
        raise ValueError(f"{name} must be integer class indices, got dtype {dtype}")
    y = y.to(device=device, dtype=torch.int64)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the predictions, got {tuple(y.shape)}")
    bad = (y < 0) | (y >= c)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name} must lie in [0, {c - 1}] for C = {c} classes, got {int(y[i])} at index {i}")
    return y


def check_scores(score: Any, name: str, n: int | None = None) -> torch.Tensor:
    """Validate a per-sample score: finite, shape ``(N,)``, non-empty (and ``N == n`` when ``n`` is given)."""
    s = as_float64(score, name)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one score per sample, shape (N,), got {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError(f"{name} is empty; at least one score is needed")
    if n is not None and s.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the predictions, got {tuple(s.shape)}")
    check_finite(s, name)
    return s


def check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)
