"""`LoraPosterior`: a Gaussian over each trained member's tensors, and ensembles of draws from it.

    post = LoraPosterior(ens, method="swag", rank=5)
    for epoch ...: train ...; post.collect()           # SWAG: running moments of every member's tensors
    # or: post = LoraPosterior(ens, method="tfb"); post.calibrate(anchor_batches, max_nll_increase=0.003)
    big = post.sample(16, seed=0)                      # a LoraEnsemble with M * 16 members, same frozen backbone
    big(**inputs)                                      # (M * 16, B, C), member-major: member 0's 16 draws first

Sampled member j = m * K + k (m the trained member, k the draw) gets draw k of member m's Gaussian (see
`swag.py` for SWAG's and `tfb.py` for TFB's). Draw (m, k) comes from its own CPU generator seeded with
(seed, m, k): the draws of `sample(4)` are the first 4 draws of each member in `sample(16)`, and a chunk of
members (`member_logits(..., member_chunk_size=...)`) is drawn without the others. `scale` multiplies the
standard deviation (0 gives the means: SWAG's running mean, TFB's trained tensors).

`include_heads=False` (SWAG) puts the Gaussian on the adapters alone: `collect()` records the A and B matrices, and
every draw keeps the member's head as the ensemble holds it (after training: the trained head). On BBC News the
SWA mean of the heads, not of the adapters, is where SWAG's NLL goes (docs/posterior.md): heads trained from a
random start grow during the collection, and their average is a shorter, less confident head than the last one.
On tweet sentiment the heads' mean costs nothing and adapters-only draws are slightly worse: an option, not the
default.

The sampled ensemble is built by `core.twin.ensemble_like` on a twin of the wrapped model that holds the same
frozen tensors (see there): one copy of the frozen weights, and `ens` is left untouched.

Files (`save_pretrained(dir)`, each written atomically): the ensemble itself (`LoraEnsemble.save_pretrained`:
the trained tensors and the base model's fingerprint), `posterior.safetensors` (SWAG's moments in float64;
TFB's sigma) and `posterior_config.json` (method, rank, counters, TFB's calibration, fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.twin import ensemble_like
from lora_ensemble.io import atomic_write_bytes, check_fingerprint, read_weights, resolve_checkpoint
from lora_ensemble.posterior.evaluation import chunked_member_logits, member_nll, split_batch
from lora_ensemble.posterior.swag import SwagMoments
from lora_ensemble.posterior.tfb import (
    TfbCalibration,
    calibration_noise,
    is_adapter,
    is_lora_A,
    rms_per_member,
    search_sigma,
)

POSTERIOR_METHODS = ("swag", "tfb")
POSTERIOR_CONFIG = "posterior_config.json"
POSTERIOR_WEIGHTS = "posterior.safetensors"
FORMAT_VERSION = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_include_heads(method: str, include_heads: bool | None) -> bool:
    """Whether the Gaussian covers the heads: None is the method's default (SWAG yes, TFB no); TFB never does."""
    if include_heads is not None and not isinstance(include_heads, bool):
        raise ValueError(f"include_heads must be True, False or None (the method's default), got {include_heads!r}")
    if method == "tfb" and include_heads:
        raise ValueError("include_heads=True is for SWAG: TFB perturbs the A matrices alone, every head keeps "
                         "its trained values")
    return method == "swag" if include_heads is None else include_heads


def draw_generator(seed: int, m: int, k: int) -> torch.Generator:
    """The CPU generator of draw k of trained member m under `seed` (a hash of the three)."""
    digest = hashlib.sha256(f"lora-posterior/{seed}/{m}/{k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class LoraPosterior:
    """Per trained member m of `ensemble`, a Gaussian over m's trainable tensors (adapters and head).

    method="swag": `collect()` adds a snapshot (running moments + the last `rank` deviations) of m's adapters and,
    with `include_heads` (the default for SWAG), m's head; method="tfb": `calibrate(batches)` finds an isotropic
    sigma_m on m's A matrices (the heads are never perturbed: `include_heads` must not be True). `sample(K)` then
    gives a LoraEnsemble of M * K members on the same frozen backbone.
    """

    def __init__(self, ensemble: LoraEnsemble, method: str = "swag", rank: int = 5,
                 include_heads: bool | None = None):
        if not isinstance(ensemble, LoraEnsemble):
            raise TypeError(f"LoraPosterior needs a LoraEnsemble, got {type(ensemble).__name__}")
        if method not in POSTERIOR_METHODS:
            raise ValueError(f"unknown posterior method {method!r}; methods: {list(POSTERIOR_METHODS)}")
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"rank (the number of SWAG deviations kept) must be an integer >= 1, got {rank!r}")
        self.ensemble, self.method, self.rank = ensemble, method, rank
        self.include_heads = resolve_include_heads(method, include_heads)
        self.swag = SwagMoments(rank)
        self.calibration: TfbCalibration | None = None

    def __repr__(self) -> str:
        state = (f"collected={self.swag.num_collected}" if self.method == "swag"
                 else f"calibrated={self.calibration is not None}")
        return (f"LoraPosterior(method={self.method!r}, rank={self.rank}, num_members={self.num_members}, "
                f"include_heads={self.include_heads}, {state})")

    @property
    def num_members(self) -> int:
        return self.ensemble.num_members

    @property
    def num_collected(self) -> int:
        return self.swag.num_collected

    def swag_tensors(self) -> dict[str, Tensor]:
        """The member tensors SWAG's Gaussian covers, {name: (M, ...)}: every one of `member_parameters()`, or the
        adapters' alone (`include_heads=False`)."""
        params = self.ensemble.member_parameters()
        return params if self.include_heads else {n: p for n, p in params.items() if is_adapter(n)}

    # ---- building the posterior -----------------------------------------------------------------------
    def collect(self) -> None:
        """SWAG: add the ensemble's current member tensors (`swag_tensors()`) as one snapshot (see
        `swag.SwagMoments.collect`)."""
        if self.method != "swag":
            raise ValueError(f"collect() builds SWAG moments; this posterior is method={self.method!r} "
                             "(use calibrate(batches))")
        self.swag.collect(self.swag_tensors())

    def _with_A(self, sigma: Tensor, noise: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The member tensors with A_m + sigma_m * E_m (sigma (M,), E as `calibration_noise`)."""
        out = {}
        for name, p in params.items():
            if name in noise:
                s = sigma.view(-1, *[1] * (p.dim() - 1)).to(torch.float64)
                out[name] = (p.detach().double().cpu() + s * noise[name]).to(p.dtype)
            else:
                out[name] = p.detach()
        return out

    def nll_increase(self, batches: Iterable[Any], sigma: Tensor | float, seed: int = 0) -> Tensor:
        """(M,) f_m(sigma_m) = NLL_m(A_m + sigma_m E_m) - NLL_m(A_m) on `batches`, with E the calibration
        noise of `seed` (as `calibrate` evaluates it); the ensemble itself is not changed."""
        batches = list(batches)
        params = self.ensemble.member_parameters()
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(self.num_members)
        probe = ensemble_like(self.ensemble, self.num_members)
        probe.load_member_state({n: p.detach() for n, p in params.items()})
        base = member_nll(probe, batches)
        probe.load_member_state(self._with_A(sigma, calibration_noise(params, seed), params))
        return member_nll(probe, batches) - base

    def calibrate(self, batches: Iterable[Any], max_nll_increase: float = 0.003, *, seed: int = 0,
                  steps: int = 20) -> TfbCalibration:
        """TFB: sigma_m = the largest sigma with f_m(sigma) <= max_nll_increase on the anchor `batches` (kept in
        memory; they must carry labels), by binary search (see `tfb.py`). One pass of the M members over the
        anchors per search step; the ensemble is not changed (the passes run on a twin, see `core/twin.py`)."""
        if self.method != "tfb":
            raise ValueError(f"calibrate() finds TFB's sigma; this posterior is method={self.method!r} "
                             "(use collect() during training)")
        if not isinstance(max_nll_increase, (int, float)) or isinstance(max_nll_increase, bool) \
                or not math.isfinite(max_nll_increase) or max_nll_increase <= 0:
            raise ValueError(f"max_nll_increase must be a number > 0, got {max_nll_increase!r}")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        batches = list(batches)
        params = self.ensemble.member_parameters()
        start = rms_per_member(params)
        noise = calibration_noise(params, seed)
        probe = ensemble_like(self.ensemble, self.num_members)
        probe.load_member_state({n: p.detach() for n, p in params.items()})
        base = member_nll(probe, batches)

        def increase_at(sigma: Tensor) -> Tensor:
            probe.load_member_state(self._with_A(sigma, noise, params))
            return member_nll(probe, batches) - base

        lo, hi, f_lo, f_hi = search_sigma(increase_at, start, float(max_nll_increase), steps)
        num_anchor = sum(len(split_batch(b)[2]) for b in batches)
        self.calibration = TfbCalibration(sigma=lo, sigma_upper=hi, nll_base=base, increase=f_lo,
                                          increase_upper=f_hi, max_nll_increase=float(max_nll_increase),
                                          seed=seed, steps=steps, num_anchor=num_anchor)
        return self.calibration

    # ---- sampling -------------------------------------------------------------------------------------
    def _check_ready(self, what: str) -> None:
        if self.method == "swag" and self.swag.num_collected == 0:
            raise RuntimeError(f"{what} needs SWAG moments: call post.collect() at least once (during training, "
                               "e.g. at each epoch's end after a warm phase) first")
        if self.method == "tfb" and self.calibration is None:
            raise RuntimeError(f"{what} needs TFB's sigma: call post.calibrate(anchor_batches) first")

    @staticmethod
    def _check_sampling(num_samples: Any, scale: Any) -> None:
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")

    def draw(self, members: Iterable[int], num_samples: int, seed: int = 0, scale: float = 1.0) -> dict[str, Tensor]:
        """The tensors of sampled members j (j = m * num_samples + k), stacked in the order given:
        {name: (len(members), ...)} in the dtype and on the device of the ensemble's member tensors."""
        self._check_ready("draw()")
        self._check_sampling(num_samples, scale)
        params = self.ensemble.member_parameters()
        rows: dict[str, list[Tensor]] = {n: [] for n in params}
        for j in members:
            m, k = divmod(j, num_samples)
            if not 0 <= m < self.num_members:
                raise IndexError(f"sampled member {j} does not exist: there are {self.num_members * num_samples}")
            g = draw_generator(seed, m, k)
            if self.method == "swag":  # tensors outside the Gaussian (the heads, include_heads=False): as held
                one = {**{n: p[m].detach() for n, p in params.items()}, **self.swag.draw(m, g, float(scale))}
            else:
                sigma = float(self.calibration.sigma[m])
                one = {}
                for name in sorted(params):
                    mu = params[name][m].detach()
                    if is_lora_A(name):
                        z = torch.randn(mu.shape, generator=g, dtype=torch.float64).to(mu.device)
                        one[name] = mu.double() + (scale * sigma) * z
                    else:
                        one[name] = mu
            for name, p in params.items():
                rows[name].append(one[name].to(device=p.device, dtype=p.dtype))
        return {n: torch.stack(r) for n, r in rows.items()}

    def sample(self, num_samples: int, seed: int = 0, scale: float = 1.0) -> LoraEnsemble:
        """A LoraEnsemble of M * num_samples members on the same frozen backbone (its frozen tensors are the
        ensemble's own, not copies), member-major by trained member: member m * K + k is draw k of member m.
        The posterior's ensemble is not changed."""
        self._check_ready("sample()")
        self._check_sampling(num_samples, scale)
        J = self.num_members * num_samples
        tensors = self.draw(range(J), num_samples, seed, scale)
        sampled = ensemble_like(self.ensemble, J)
        sampled.load_member_state(tensors, source="posterior draws")
        return sampled

    def member_logits(self, batches: Iterable[Any], num_samples: int, *, seed: int = 0, scale: float = 1.0,
                      member_chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The member logits (M * num_samples, N, C) of `sample(num_samples, seed, scale)` over `batches` (and
        the labels (N,), or None), computed `member_chunk_size` sampled members at a time (each chunk drawn
        and run on its own, on the shared backbone) and concatenated: the same logits as the full sampled
        ensemble, at the memory of a chunk. `batches` is iterated once per chunk (a list or a DataLoader)."""
        self._check_ready("member_logits()")
        self._check_sampling(num_samples, scale)

        def load(ens: LoraEnsemble, members: range) -> None:
            ens.load_member_state(self.draw(members, num_samples, seed, scale), source="posterior draws")

        return chunked_member_logits(lambda n: ensemble_like(self.ensemble, n), load,
                                     self.num_members * num_samples, batches, member_chunk_size)

    # ---- files ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the ensemble (`LoraEnsemble.save_pretrained`), `posterior.safetensors` and
        `posterior_config.json` into folder `path`, each file atomically (the JSON last)."""
        os.makedirs(path, exist_ok=True)
        self.ensemble.save_pretrained(path)
        tensors, counters = self.swag.state()
        if self.calibration is not None:
            tensors = {**tensors, "tfb/sigma": self.calibration.sigma}
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        atomic_write_bytes(os.path.join(path, POSTERIOR_WEIGHTS), safetensors_save(tensors, {"format": "pt"}))
        meta = {"format_version": FORMAT_VERSION, "method": self.method, "rank": self.rank,
                "include_heads": self.include_heads,
                "num_members": self.num_members, "swag": counters,
                "tfb": None if self.calibration is None else self.calibration.to_dict(),
                "base_model": self.ensemble.base_fingerprint}
        atomic_write_bytes(os.path.join(path, POSTERIOR_CONFIG), json.dumps(meta, indent=2, sort_keys=True).encode())

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike) -> "LoraPosterior":
        """Load a saved posterior onto `model`: the base model it was trained on (the saved ensemble is rebuilt
        on it), or a LoraEnsemble on that base model with the same member tensors. Another base model (class
        or parameter shapes) is a ValueError, as for `LoraEnsemble.from_pretrained`."""
        path = resolve_checkpoint(path)
        meta_path = os.path.join(path, POSTERIOR_CONFIG)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: a posterior folder holds {POSTERIOR_CONFIG} and "
                                    f"{POSTERIOR_WEIGHTS} (written by LoraPosterior.save_pretrained)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            method, rank, expected = meta["method"], meta["rank"], meta["base_model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path} is not a valid posterior config file ({e})") from None
        if isinstance(model, LoraEnsemble):
            check_fingerprint(expected, model.base_fingerprint, path)
            if model.num_members != meta.get("num_members"):
                raise ValueError(f"the posterior in {os.fspath(path)!r} is for {meta.get('num_members')} members, "
                                 f"the ensemble given has {model.num_members}")
            ensemble = model
        else:
            ensemble = LoraEnsemble.from_pretrained(model, path)  # checks the fingerprint
        post = cls(ensemble, method, rank, meta.get("include_heads"))  # files before it: the method's default
        tensors = read_weights(os.path.join(path, POSTERIOR_WEIGHTS))
        params = post.swag_tensors()
        device = next(iter(params.values())).device
        swag = {n: t for n, t in tensors.items() if not n.startswith("tfb/")}
        post.swag.load_state(swag, meta["swag"], {n: p.shape for n, p in params.items()}, device, os.fspath(path))
        if meta.get("tfb") is not None:
            post.calibration = TfbCalibration.from_dict(meta["tfb"])
            if post.calibration.sigma.numel() != ensemble.num_members:
                raise ValueError(f"{meta_path}: TFB's sigma has {post.calibration.sigma.numel()} entries for "
                                 f"{ensemble.num_members} members")
        return post
