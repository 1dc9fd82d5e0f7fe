"""Shared machinery of the methods: run one module under K stacked weight sets, and a forked RNG.

`StackedCall` runs `module` once per weight set k, with every named tensor t replaced by t[k]:

    out[k] = functional_call(module, {name: t[k] for name, t in stacked.items()}, args, kwargs)   -> (K, B, ...)

as one `torch.func.vmap` over k where the model allows it, else as a Python loop over k. Which of the two
works is found on the first call and remembered (`vectorize`), so later calls never retry a failing vmap.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lora_ensemble.core.batch import output_tensor


class StackedCall:
    """Calls `module` under K stacked weight sets; `vectorize`: True (vmap), False (loop), None (find out).

    The inputs are shared by all K calls (not repeated); inside vmap each call sees the batch of B.
    Dropout draws independent masks per weight set in both paths (vmap randomness='different').
    """

    def __init__(self, vectorize: bool | None = None, owner: str = "method"):
        if vectorize not in (None, True, False):
            raise ValueError(f"vectorize must be True, False or None (try vmap, fall back to a loop), got {vectorize!r}")
        self.vectorize = vectorize
        self.owner = owner
        self.fallback_reason: str | None = None

    def __call__(self, module: nn.Module, stacked: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        if self.vectorize is False:
            return self._loop(module, stacked, args, kwargs)
        if self.vectorize:
            return self._vmap(module, stacked, args, kwargs)
        try:
            out = self._vmap(module, stacked, args, kwargs)
        except Exception as e:  # any failure inside vmap: data-dependent control flow, in-place ops, ...
            out = self._loop(module, stacked, args, kwargs)  # the inputs are fine if this works
            self.vectorize, self.fallback_reason = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                f"{self.owner}: torch.func.vmap does not run {type(module).__name__} "
                f"({self.fallback_reason[:200]}); running the members in a loop from now on",
                stacklevel=3,
            )
            return out
        self.vectorize = True
        return out

    @staticmethod
    def _vmap(module: nn.Module, stacked: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        def one(weights: dict[str, Tensor]) -> Tensor:
            return output_tensor(functional_call(module, weights, args, kwargs))

        return vmap(one, randomness="different")(dict(stacked))

    @staticmethod
    def _loop(module: nn.Module, stacked: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        count = next(iter(stacked.values())).shape[0]
        outs = [
            output_tensor(functional_call(module, {n: t[k] for n, t in stacked.items()}, args, kwargs))
            for k in range(count)
        ]
        return torch.stack(outs)


def single_output(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """One ordinary forward as one member: (1, B, ...)."""
    return output_tensor(model(*args, **kwargs)).unsqueeze(0)


@contextlib.contextmanager
def forked_rng(seed: int | None, devices: list[torch.device]) -> Iterator[None]:
    """Inside: the RNGs of the CPU and of the CUDA `devices` seeded with `seed`; outside: untouched.
    With seed None, nothing is forked (the global RNG is used and advances)."""
    if seed is None:
        yield
        return
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def model_devices(module: nn.Module) -> list[torch.device]:
    return list({p.device for p in module.parameters()} | {b.device for b in module.buffers()})
