"""SWAG moments of M members' tensors (Maddox et al. 2019, "A Simple Baseline for Bayesian Uncertainty in Deep
Learning"; applied to LoRA as in SWAG-LoRA), one Gaussian per member.

For member m with flattened trainable tensors theta_m (its adapters and its head), after n calls of `collect`
with snapshots theta_m^(1..n):

    mean_m    = 1/n sum_i theta_m^(i)                      running first moment
    sq_mean_m = 1/n sum_i (theta_m^(i))^2                  running second moment (elementwise)
    diag_m    = max(sq_mean_m - mean_m^2, 0)               diagonal variance
    D_m       = [theta_m^(i) - mean_m^(i)]  for the last K <= rank snapshots   (K x d deviation matrix;
                mean_m^(i) is the running mean just after snapshot i, as SWAG stores it)

    Sigma_m   = diag(diag_m) / 2 + D_m^T D_m / (2 (K - 1))          (K - 1 read as 1 when K = 1)

and a draw with `scale` s is

    theta = mean_m + s * ( sqrt(diag_m / 2) * z1 + D_m^T z2 / sqrt(2 (K - 1)) ),   z1 ~ N(0, I_d), z2 ~ N(0, I_K)

so that Cov(theta) = s^2 Sigma_m; z2 is one vector per draw, shared by all of the member's tensors (the
low-rank part couples them). Moments are kept in float64 on the members' device (float32 where the device has
no float64), stacked with leading dim M like `LoraEnsemble.member_parameters()`: mean/sq_mean (M, ...) and
deviations (rank, M, ...), a ring buffer holding the last `rank` deviations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def moment_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class SwagMoments:
    """Running SWAG moments; `collect(params)` with params {name: (M, ...)} as `member_parameters()` gives."""

    def __init__(self, rank: int):
        self.rank = rank
        self.num_collected = 0
        self.num_deviations = 0   # K = min(num_collected, rank)
        self.position = 0         # the ring buffer slot the next deviation goes to
        self.mean: dict[str, Tensor] = {}
        self.sq_mean: dict[str, Tensor] = {}
        self.deviations: dict[str, Tensor] = {}

    @torch.no_grad()
    def collect(self, params: Mapping[str, Tensor]) -> None:
        """Add one snapshot of every member's tensors: mean += (theta - mean) / n, sq_mean likewise with
        theta^2, then store theta - mean (the updated mean) in the ring buffer."""
        if self.mean and (set(params) != set(self.mean) or any(
                params[n].shape != self.mean[n].shape for n in params)):
            raise ValueError("collect(): the ensemble's member tensors changed names or shapes since the first "
                             "collect(); a posterior collects one ensemble")
        n = self.num_collected + 1
        for name, p in params.items():
            theta = p.detach().to(moment_dtype(p.device))
            if name not in self.mean:
                self.mean[name] = torch.zeros_like(theta)
                self.sq_mean[name] = torch.zeros_like(theta)
                self.deviations[name] = torch.zeros((self.rank, *theta.shape), dtype=theta.dtype, device=theta.device)
            mean, sq = self.mean[name], self.sq_mean[name]
            mean += (theta - mean) / n
            sq += (theta * theta - sq) / n
            self.deviations[name][self.position] = theta - mean
        self.num_collected = n
        self.num_deviations = min(n, self.rank)
        self.position = (self.position + 1) % self.rank

    def variance(self, name: str) -> Tensor:
        """diag (M, ...) = max(sq_mean - mean^2, 0)."""
        mean = self.mean[name]
        return (self.sq_mean[name] - mean * mean).clamp_min(0)

    def draw(self, m: int, generator: torch.Generator, scale: float) -> dict[str, Tensor]:
        """One draw of member m's tensors (shapes without the member dim), in the moments' dtype. The
        generator (a CPU one) gives z2 first, then z1 for each tensor in sorted name order."""
        K = self.num_deviations
        dtype = next(iter(self.mean.values())).dtype
        z2 = torch.randn(K, generator=generator, dtype=torch.float64) if K else None
        c = 1.0 / math.sqrt(2 * max(K - 1, 1))
        out = {}
        for name in sorted(self.mean):
            mu = self.mean[name][m]
            z1 = torch.randn(mu.shape, generator=generator, dtype=torch.float64).to(mu.device, dtype)
            x = ((self.sq_mean[name][m] - mu * mu).clamp_min(0) / 2).sqrt() * z1
            if K:
                low = torch.tensordot(z2.to(mu.device, dtype), self.deviations[name][:K, m], dims=1)
                x = x + c * low
            out[name] = mu + scale * x
        return out

    # ---- files ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """(tensors by 'mean/<name>', 'sq_mean/<name>', 'deviations/<name>'; counters)."""
        tensors = {}
        for name in self.mean:
            tensors[f"mean/{name}"] = self.mean[name]
            tensors[f"sq_mean/{name}"] = self.sq_mean[name]
            tensors[f"deviations/{name}"] = self.deviations[name]
        counters = {"num_collected": self.num_collected, "num_deviations": self.num_deviations,
                    "position": self.position}
        return tensors, counters

    def load_state(self, tensors: Mapping[str, Tensor], counters: Mapping[str, int],
                   expected: Mapping[str, torch.Size], device: torch.device, source: str) -> None:
        """Restore from `state()`; `expected` are the member tensors' shapes {name: (M, ...)}."""
        names = {k.split("/", 1)[1] for k in tensors if "/" in k}
        if names != set(expected) and tensors:
            raise ValueError(f"{source}: the SWAG moments are for other member tensors than this ensemble's "
                             f"(missing {sorted(set(expected) - names)[:3]}, unexpected {sorted(names - set(expected))[:3]})")
        for name, shape in expected.items():
            if not tensors:
                break
            for kind, want in (("mean", tuple(shape)), ("sq_mean", tuple(shape)),
                               ("deviations", (self.rank, *shape))):
                t = tensors.get(f"{kind}/{name}")
                if t is None or tuple(t.shape) != want:
                    raise ValueError(f"{source}: {kind}/{name} is missing or has shape "
                                     f"{None if t is None else tuple(t.shape)}, expected {want}")
        dtype = moment_dtype(device)
        self.mean = {n: tensors[f"mean/{n}"].to(device, dtype) for n in expected} if tensors else {}
        self.sq_mean = {n: tensors[f"sq_mean/{n}"].to(device, dtype) for n in expected} if tensors else {}
        self.deviations = {n: tensors[f"deviations/{n}"].to(device, dtype) for n in expected} if tensors else {}
        self.num_collected = int(counters["num_collected"])
        self.num_deviations = int(counters["num_deviations"])
        self.position = int(counters["position"])
