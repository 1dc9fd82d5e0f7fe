"""Mode connectivity: loss and accuracy along the straight path between two members of a `LoraEnsemble`.

For members i and j (adapters A (r, in), B (out, r), scaling s, heads h) the path is

    dW(a) = (1 - a) dW_i + a dW_j = s [(1 - a) B_i, a B_j] [A_i; A_j],     h(a) = (1 - a) h_i + a h_j,

exactly a rank-2r LoRA update: B(a) = [(1 - a) B_i, a B_j] (out, 2r), A(a) = [A_i; A_j] (2r, in). So every grid
point a_g of every pair's path is one member of ONE temporary rank-2r `LoraEnsemble` (`path_ensemble`) with
K = pairs x points members on the same frozen weights (shared, not copied), and a whole set of curves costs one
batched forward per data batch. The loss along a path is the mean cross-entropy L(a) of the grid point's
member; its barrier is

    barrier = max_a L(a) - [(1 - a) L(0) + a L(1)]       (>= 0; 0 for a path inside one convex basin)

and the accuracy barrier max_a [(1 - a) acc(0) + a acc(1)] - acc(a). The control is the same curve between two
snapshots of ONE member (an earlier state of the same training run, `end_state`): a path that stays in one mode.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.core.batch import output_tensor
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.twin import ensemble_like


def grid(num_points: int = 11) -> list[float]:
    """a_g = g / (num_points - 1), g = 0 .. num_points - 1 (both end points included)."""
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"a path needs num_points >= 2 (both end points), got {num_points!r}")
    return [g / (num_points - 1) for g in range(num_points)]


def member_pairs(num_members: int, max_pairs: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """Every pair i < j, or a sample of `max_pairs` of them (drawn with `seed`, in sorted order)."""
    pairs = [(i, j) for i in range(num_members) for j in range(i + 1, num_members)]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
    return pairs


def path_ensemble(ensemble: LoraEnsemble, pairs: Sequence[tuple[int, int]], alphas: Sequence[float],
                  end_state: Mapping[str, Tensor] | None = None) -> LoraEnsemble:
    """A temporary rank-2r LoraEnsemble with K = len(pairs) * len(alphas) members; member p * G + g is the point
    a = alphas[g] on the path from member i of `ensemble` (a = 0) to member j (a = 1) of pairs[p] = (i, j).

    `end_state` ({name: (M, ...)} as `ensemble.member_parameters()`, e.g. an earlier snapshot of the same run)
    gives the a = 1 end's tensors instead of `ensemble`'s own (the control: pairs (m, m)). The frozen weights are
    shared with `ensemble`; the returned ensemble is in eval mode."""
    if not isinstance(ensemble, LoraEnsemble):
        raise TypeError(f"path_ensemble needs a LoraEnsemble, got {type(ensemble).__name__}")
    M, G = ensemble.num_members, len(alphas)
    if not pairs or not G:
        raise ValueError("path_ensemble needs at least one pair and one grid point")
    for i, j in pairs:
        if not (0 <= i < M and 0 <= j < M):
            raise ValueError(f"member pair ({i}, {j}) is out of range for {M} members")
    start = {n: p.detach() for n, p in ensemble.member_parameters().items()}
    end = start if end_state is None else dict(end_state)
    if set(end) != set(start) or any(end[n].shape != start[n].shape for n in start):
        raise ValueError("end_state does not hold the same per-member tensors as the ensemble")
    # the members' own scaling at rank 2r (ensemble_like keeps it; alpha / 2r would halve it)
    path = ensemble_like(ensemble, len(pairs) * G, r=2 * ensemble.ensemble_config.r, lora_dropout=0.0)
    params = path.member_parameters()
    if set(params) != set(start):
        raise ValueError("the path ensemble's per-member tensors do not match the ensemble's")
    a = torch.tensor(list(alphas), dtype=torch.float64)
    i_idx = torch.tensor([i for i, _ in pairs]).repeat_interleave(G)
    j_idx = torch.tensor([j for _, j in pairs]).repeat_interleave(G)
    with torch.no_grad():
        for name, p in params.items():
            x, y = start[name][i_idx].double(), end[name].to(start[name].device)[j_idx].double()   # (K, ...)
            w = a.repeat(len(pairs)).to(x.device).view(-1, *([1] * (x.dim() - 1)))             # (K, 1, ...)
            if name.endswith("lora_A"):          # (K, [P,] 2r, in) = [A_i; A_j]
                value = torch.cat([x, y], dim=-2)
            elif name.endswith("lora_B"):        # (K, [P,] out, 2r) = [(1 - a) B_i, a B_j]
                value = torch.cat([(1 - w) * x, w * y], dim=-1)
            else:                                # heads: (1 - a) h_i + a h_j
                value = (1 - w) * x + w * y
            p.copy_(value.to(p.dtype))
    return path.eval()


def _chunks(inputs: Any, batch_size: int, size: int) -> list[Any]:
    """A batch's inputs (keyword dict or positional tuple) split along their leading (batch) dimension into
    pieces of at most `size` rows; tensors without that leading dimension are passed whole."""
    if size >= batch_size:
        return [inputs]

    def cut(v: Any, s: int) -> Any:
        return v[s:s + size] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch_size else v

    if isinstance(inputs, Mapping):
        return [{k: cut(v, s) for k, v in inputs.items()} for s in range(0, batch_size, size)]
    return [tuple(cut(v, s) for v in inputs) for s in range(0, batch_size, size)]


def call(model: nn.Module, inputs: Any) -> Tensor:
    """model(**inputs) for a keyword dict, model(*inputs) for a tuple; the prediction tensor."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    return output_tensor(out)


def path_curves(ensemble: LoraEnsemble, batches: Iterable[tuple[Mapping[str, Any], Tensor]],
                pairs: Sequence[tuple[int, int]], num_points: int = 11, end_state: Mapping[str, Tensor] | None = None,
                temperature: float = 1.0, max_rows: int = 4096) -> dict[str, Any]:
    """Loss and accuracy along the straight path of every pair, from one batched pass per data batch.

    `batches` yields (model inputs for batch B: a keyword dict or a positional tuple, labels (B,)); each batch runs through the
    path ensemble in pieces of at most `max_rows` member rows (K x piece). Returns plain Python values:
    {"alphas" (G,), "pairs", "loss" (P, G) mean cross-entropy of logits / temperature, "acc" (P, G),
    "barrier" (P,), "acc_barrier" (P,), "mean_barrier", "mean_acc_barrier", "num_samples"}."""
    alphas = grid(num_points)
    path = path_ensemble(ensemble, pairs, alphas, end_state)
    K, P, G = len(pairs) * num_points, len(pairs), num_points
    nll = torch.zeros(K, dtype=torch.float64)
    correct = torch.zeros(K, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for inputs, labels in batches:
            B, offset = len(labels), 0
            for piece in _chunks(inputs, B, max(1, max_rows // K)):
                z = call(path, piece).double() / temperature                                   # (K, b, C)
                y = labels[offset:offset + z.shape[1]].to(z.device)
                offset += z.shape[1]
                logp = torch.log_softmax(z, dim=-1)
                nll += -logp.gather(2, y.expand(K, -1)[..., None]).squeeze(-1).sum(dim=1).cpu()
                correct += (z.argmax(dim=-1) == y).sum(dim=1).double().cpu()
            n += B
    if n == 0:
        raise ValueError("path_curves got no data batches")
    loss, acc = (nll / n).view(P, G), (correct / n).view(P, G)
    a = torch.tensor(alphas, dtype=torch.float64)
    chord = (1 - a) * loss[:, :1] + a * loss[:, -1:]                # (P, G) the straight line between the ends
    acc_chord = (1 - a) * acc[:, :1] + a * acc[:, -1:]
    barrier, acc_barrier = (loss - chord).amax(dim=1), (acc_chord - acc).amax(dim=1)
    return {"alphas": alphas, "pairs": [list(p) for p in pairs], "loss": loss.tolist(), "acc": acc.tolist(),
            "barrier": barrier.tolist(), "acc_barrier": acc_barrier.tolist(),
            "mean_barrier": float(barrier.mean()), "mean_acc_barrier": float(acc_barrier.mean()), "num_samples": n}
