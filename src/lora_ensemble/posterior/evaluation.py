"""Running an ensemble over batches: member logits, per-member NLL, and the members in chunks.

A batch is a mapping of the model's keyword inputs plus `labels` (B,) (what the data loaders of this project
give; `sample_ids` is dropped), or a pair (inputs, labels) with inputs a tensor or a mapping.

    member_logits(ens, batches)          -> (logits (M, N, C), labels (N,) or None)   N = samples over all batches
    member_nll(ens, batches)             -> (M,) float64: NLL_m = 1/N sum_i -log softmax(z_mi)[y_i]
    chunked_member_logits(build, load, J, batches, member_chunk_size)
                                         -> (J, N, C): members j0..j1 at a time, concatenated in member order
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.losses import LABELS

SAMPLE_IDS = "sample_ids"


def split_batch(batch: Any) -> tuple[tuple, dict, Tensor | None]:
    """(args, kwargs, labels) of one batch (see the module docstring)."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in (LABELS, SAMPLE_IDS)}
        return (), kwargs, batch.get(LABELS)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        if isinstance(inputs, Mapping):
            return (), dict(inputs), labels
        return (inputs,), {}, labels
    raise TypeError(f"a batch is a mapping of model inputs with 'labels', or a pair (inputs, labels); got "
                    f"{type(batch).__name__}")


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x


@torch.no_grad()
def member_logits(ens: LoraEnsemble, batches: Iterable[Any]) -> tuple[Tensor, Tensor | None]:
    """Member logits (M, N, C) in float32 on the CPU over all batches (eval mode for the pass, then the
    ensemble's mode as before), and the labels (N,) (None when the batches carry none)."""
    device = next(iter(ens.member_parameters().values())).device
    was_training = ens.training
    ens.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            args, kwargs, y = split_batch(batch)
            z = ens(*[_to(a, device) for a in args], **{k: _to(v, device) for k, v in kwargs.items()})
            logits.append(z.float().cpu())
            if y is not None:
                labels.append(y.cpu())
    finally:
        ens.train(was_training)
    if not logits:
        raise ValueError("no batches: the anchor / evaluation set is empty")
    return torch.cat(logits, dim=1), (torch.cat(labels) if labels else None)


def nll_per_member(logits: Tensor, labels: Tensor) -> Tensor:
    """(M,) float64: NLL_m = 1/N sum_i CE(logits[m, i], labels[i]), logits (M, N, C)."""
    M, N, C = logits.shape
    ce = F.cross_entropy(logits.double().reshape(M * N, C), labels.repeat(M).long(), reduction="none")
    return ce.view(M, N).mean(dim=1)


def member_nll(ens: LoraEnsemble, batches: Iterable[Any]) -> Tensor:
    """(M,) float64: each member's mean NLL on `batches` (which must carry labels)."""
    logits, labels = member_logits(ens, batches)
    if labels is None:
        raise ValueError("the anchor batches carry no labels; the NLL needs them")
    return nll_per_member(logits, labels)


def chunked_member_logits(build: Callable[[int], LoraEnsemble], load: Callable[[LoraEnsemble, range], None],
                          num_members: int, batches: Iterable[Any],
                          member_chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Member logits (J, N, C) of J = `num_members` members, run `member_chunk_size` members at a time: for
    each chunk [j0, j1) an ensemble of j1 - j0 members (`build(n)`, reused while the size stays) is given the
    chunk's tensors (`load(ens, range(j0, j1))`) and run over all batches; the chunks' logits are concatenated
    in member order. One pass costs (j1 - j0) * B rows instead of J * B. `batches` is iterated once per chunk
    (a list or a DataLoader). None: one chunk of all J members."""
    if member_chunk_size is None:
        member_chunk_size = num_members
    if not isinstance(member_chunk_size, int) or isinstance(member_chunk_size, bool) or member_chunk_size < 1:
        raise ValueError(f"member_chunk_size must be an integer >= 1 (or None), got {member_chunk_size!r}")
    parts, labels, ens = [], None, None
    for j0 in range(0, num_members, member_chunk_size):
        j1 = min(j0 + member_chunk_size, num_members)
        if ens is None or ens.num_members != j1 - j0:
            ens = build(j1 - j0)
        load(ens, range(j0, j1))
        logits, labels = member_logits(ens, batches)
        parts.append(logits)
    return torch.cat(parts, dim=0), labels
