"""An ensemble with any number of members (and any rank) on the frozen backbone of an existing `LoraEnsemble`.

`LoraEnsemble(model, ...)` rebuilds `model` in place, so a second ensemble cannot be built on the model an
ensemble already wraps. `ensemble_like(ens, N)` builds it on a *shallow twin* of that model instead:

    twin = copy.deepcopy(ens.model, memo)      memo maps every frozen parameter and buffer of ens.model to
                                               itself, and every adapted module / per-member head of ens.model
                                               to a (shared-weight) copy of the module it replaced
    LoraEnsemble(twin, ens.ensemble_config.replace(num_members=N))

The twin has new module objects (its own train/eval mode, its own adapters) but holds the very same frozen
tensors as `ens.model` (same `data_ptr`): the frozen weights stay one copy, and only the N members' adapters
and heads are new memory. `ens` itself is not touched. The twin's base fingerprint equals `ens`'s, so
everything downstream (`save_pretrained`, `member()`, `export_peft`) sees the same base model.

Users: posterior draws (`LoraPosterior.sample`, N = M * K members) and the paths of `analysis.connectivity`
(rank-2r members whose update is a point on the line between two members' updates).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch

from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear


def frozen_tensors(ens: LoraEnsemble) -> list[torch.Tensor]:
    """Every parameter and buffer of `ens.model` that is not a per-member (trainable) parameter."""
    member = {id(p) for p in ens.member_parameters().values()}
    seen, result = set(), []
    for t in itertools.chain(ens.model.parameters(), ens.model.buffers()):
        if id(t) not in member and id(t) not in seen:
            seen.add(id(t))
            result.append(t)
    return result


def ensemble_like(ens: LoraEnsemble, num_members: int, **config_changes: Any) -> LoraEnsemble:
    """A new `LoraEnsemble` with `num_members` members (freshly initialised, on the devices and dtypes of
    `ens`'s members) on the frozen tensors of `ens` (shared, not copied); `ens` is left as it was.
    `config_changes` replace further fields of `ens.ensemble_config` for the new members; `r=r2` gives adapters
    of rank r2 that keep `ens`'s scaling s (not lora_alpha / r2), so that a member holding
    A = [A_1; ...; A_n], B = [c_1 B_1, ..., c_n B_n] adds exactly s sum_t c_t B_t A_t."""
    if not isinstance(ens, LoraEnsemble):
        raise TypeError(f"ensemble_like needs a LoraEnsemble, got {type(ens).__name__}")
    if getattr(ens, "_unloaded", False):
        raise RuntimeError("this LoraEnsemble was unloaded; there is no backbone to share")
    memo: dict[int, object] = {id(t): t for t in frozen_tensors(ens)}
    for original in ens._replaced.values():  # the original heads' tensors: frozen, shared as well
        for t in itertools.chain(original.parameters(), original.buffers()):
            memo.setdefault(id(t), t)
    for name, original in ens._replaced.items():
        memo[id(ens.model.get_submodule(name))] = copy.deepcopy(original, memo)
    twin = copy.deepcopy(ens.model, memo)
    sampled = LoraEnsemble(twin, ens.ensemble_config.replace(**{**config_changes, "num_members": num_members}))
    for name, layer in sampled.model.named_modules():  # ens's scaling, whatever the rank (alpha / r would change it)
        if isinstance(layer, (LoraEnsembleLinear, LoraEnsembleFusedLinear)):
            layer.scaling = ens.model.get_submodule(name).scaling
    sampled._requires_grad = dict(ens._requires_grad)  # unload() gives back what the user's model had
    if "return_dict" in vars(ens):
        sampled.return_dict = ens.return_dict
    reference = ens.member_parameters()
    with torch.no_grad():
        for name, p in sampled.member_parameters().items():
            ref = reference[name]
            if p.device != ref.device or p.dtype != ref.dtype:
                p.data = p.data.to(device=ref.device, dtype=ref.dtype)
    sampled.train(ens.training)
    return sampled


def shares_backbone(a: LoraEnsemble, b: LoraEnsemble) -> bool:
    """Whether every frozen tensor of `b` is a frozen tensor of `a` (same storage)."""
    ptrs = {t.data_ptr() for t in frozen_tensors(a)}
    return all(t.data_ptr() in ptrs for t in frozen_tensors(b) if t.numel())


__all__ = ["ensemble_like", "frozen_tensors", "shares_backbone"]
