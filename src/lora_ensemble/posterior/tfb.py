"""Training-free posterior sigma (after TFB, Shi et al. 2024, "Training-Free Bayesianization for Low-Rank
Adapters of Large Language Models"): an isotropic Gaussian on each member's LoRA A matrices,

    A_m ~ N(A_m^trained, sigma_m^2 I),     every other tensor of member m (B, head) stays as trained,

with sigma_m the largest value whose anchor NLL increase stays within a threshold eps:

    f_m(sigma) = NLL_m(A_m + sigma * E_m) - NLL_m(A_m) <= eps       E_m ~ N(0, I), one fixed draw (`seed`)

found by binary search, per member, all members at once (one pass of the M-member ensemble over the anchor
set per step): the bracket [0, hi] starts at hi = RMS(A_m) and doubles while f_m(hi) <= eps (at most
`max_doublings` times), then `steps` bisections keep lo with f_m(lo) <= eps and hi with f_m(hi) > eps (a NaN
counts as > eps). sigma_m = lo, sigma_upper_m = hi, so hi / lo - 1 shrinks as 2^-steps. The fixed E_m makes
f_m deterministic; a fresh draw z at sampling time has about the same NLL increase where d (the number of A
entries) is large, since ||z|| concentrates around sqrt(d).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def is_lora_A(name: str) -> bool:
    """The LoRA A matrices (r x in) of the adapted projections: parameters named `...lora_A`."""
    return name.rsplit(".", 1)[-1] == "lora_A"


def is_adapter(name: str) -> bool:
    """The adapters' tensors (`...lora_A`, `...lora_B`), as opposed to the per-member heads'."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def calibration_noise(params: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """E: a standard normal float64 draw (CPU) of the shape of every A tensor (M, ...), in sorted name order."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in sorted(params) if is_lora_A(n)}


def rms_per_member(params: Mapping[str, Tensor]) -> Tensor:
    """(M,) float64: the root mean square of member m's A entries."""
    a = [params[n].detach().double().cpu().flatten(1) for n in sorted(params) if is_lora_A(n)]
    if not a:
        raise ValueError("method='tfb' puts its noise on the LoRA A matrices, and this ensemble has none (only heads)")
    flat = torch.cat(a, dim=1)
    return flat.pow(2).mean(dim=1).sqrt()


@dataclass
class TfbCalibration:
    """What `calibrate()` found, per member m (tensors (M,), float64): `sigma` (f_m(sigma) <= eps),
    `sigma_upper` (f_m > eps there; inf when no tried value exceeded eps), `nll_base` NLL_m(trained),
    `increase` f_m(sigma), `increase_upper` f_m(sigma_upper)."""

    sigma: Tensor
    sigma_upper: Tensor
    nll_base: Tensor
    increase: Tensor
    increase_upper: Tensor
    max_nll_increase: float
    seed: int
    steps: int
    num_anchor: int

    def to_dict(self) -> dict[str, Any]:
        def floats(t: Tensor) -> list[float | None]:
            return [None if not math.isfinite(v) else v for v in t.tolist()]
        return {"sigma": floats(self.sigma), "sigma_upper": floats(self.sigma_upper),
                "nll_base": floats(self.nll_base), "increase": floats(self.increase),
                "increase_upper": floats(self.increase_upper), "max_nll_increase": self.max_nll_increase,
                "seed": self.seed, "steps": self.steps, "num_anchor": self.num_anchor}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TfbCalibration":
        def tensor(v: list, missing: float) -> Tensor:
            return torch.tensor([missing if x is None else x for x in v], dtype=torch.float64)
        return cls(sigma=tensor(d["sigma"], math.nan), sigma_upper=tensor(d["sigma_upper"], math.inf),
                   nll_base=tensor(d["nll_base"], math.nan), increase=tensor(d["increase"], math.nan),
                   increase_upper=tensor(d["increase_upper"], math.nan), max_nll_increase=float(d["max_nll_increase"]),
                   seed=int(d["seed"]), steps=int(d["steps"]), num_anchor=int(d["num_anchor"]))


def search_sigma(increase_at: Callable[[Tensor], Tensor], start: Tensor, max_nll_increase: float, steps: int,
                 max_doublings: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Binary search (see the module docstring) with `increase_at(sigma (M,)) -> f(sigma) (M,)`:
    returns (lo, hi, f(lo), f(hi))."""
    M = start.numel()
    lo, hi = torch.zeros(M, dtype=torch.float64), start.double().clone()
    f_lo, f_hi = torch.zeros(M, dtype=torch.float64), torch.full((M,), math.nan, dtype=torch.float64)
    open_ = torch.ones(M, dtype=torch.bool)  # members whose f(hi) <= eps so far: their hi grows
    for _ in range(max_doublings + 1):
        f = increase_at(hi)
        ok = (f <= max_nll_increase) & open_
        f_hi = torch.where(open_ & ~ok, f, f_hi)
        lo, f_lo = torch.where(ok, hi, lo), torch.where(ok, f, f_lo)
        open_ = ok
        if not open_.any():
            break
        hi = torch.where(ok, hi * 2, hi)
    hi = torch.where(open_, torch.full_like(hi, math.inf), hi)  # never exceeded: no upper bound found
    finite = torch.isfinite(hi)
    for _ in range(steps if finite.any() else 0):
        mid = torch.where(finite, (lo + hi) / 2, lo)
        f = increase_at(mid)
        ok = (f <= max_nll_increase) & finite
        bad = ~(f <= max_nll_increase) & finite
        lo, f_lo = torch.where(ok, mid, lo), torch.where(ok, f, f_lo)
        hi, f_hi = torch.where(bad, mid, hi), torch.where(bad, f, f_hi)
    return lo, hi, f_lo, f_hi
