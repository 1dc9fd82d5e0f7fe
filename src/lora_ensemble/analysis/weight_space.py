"""Weight-space diversity of a `LoraEnsemble`: how the members' weight updates relate.

A and B alone are defined only up to an r x r change of basis (B A = (B R)(R^-1 A)), so members are compared
through their full updates dW_m = s B_m A_m (out, in), never through A or B. For one adapted projection
(a fused q/k/v one: each adapted part p, whose row blocks are disjoint, adds its own term) the Gram matrix of
the members' updates is, by the trace identity <B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T)),

    G[i, j] = <dW_i, dW_j>_F = s^2 sum_p tr((B_ip^T B_jp)(A_jp A_ip^T))                 (M, M)

which costs O(M^2 P r^2 (in + out)) and never forms an (out, in) matrix. Summed over every adapted projection,
G_total = sum_layers G is the Gram matrix of the flattened whole-model updates vec(dW_m). From a Gram matrix:

    cosine[i, j]   = G[i, j] / sqrt(G[i, i] G[j, j])           (NaN where a member's update is 0)
    effective rank = exp(H(q)), q_k = sigma_k / sum_k sigma_k   (Roy & Vetterli 2007; sigma_k = sqrt(eig_k(G)),
                     the singular values of the stacked (M, D) update matrix): 1 when all updates are parallel,
                     M when they are orthogonal with equal norms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear


def adapted_layers(ensemble: nn.Module) -> dict[str, nn.Module]:
    """Every adapted projection (LoraEnsembleLinear, LoraEnsembleFusedLinear) of a LoraEnsemble (or of any
    module holding them), by name."""
    return {name: m for name, m in ensemble.named_modules() if isinstance(m, (LoraEnsembleLinear, LoraEnsembleFusedLinear))}


def _factors(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(A (M, P, r, in), B (M, P, d, r)) in float64; P = 1 for a plain projection."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if isinstance(layer, LoraEnsembleLinear):
        A, B = A.unsqueeze(1), B.unsqueeze(1)
    return A, B


def update_gram(layer: nn.Module) -> Tensor:
    """(M, M) float64: G[i, j] = <dW_i, dW_j>_F of one adapted projection, by the trace identity (no dW formed)."""
    A, B = _factors(layer)
    btb = torch.einsum("ipoa,jpob->ijpab", B, B)                     # (B_ip^T B_jp)[a, b]
    aat = torch.einsum("jpbn,ipan->ijpab", A, A)                     # (A_jp A_ip^T)[b, a], stored at [a, b]
    return layer.scaling ** 2 * (btb * aat).sum(dim=(2, 3, 4))


def cosine_from_gram(gram: Tensor) -> Tensor:
    """(M, M) cosine similarity from a Gram matrix; NaN where a member's norm is 0."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.full_like(gram, float("nan")))


def effective_rank(gram: Tensor) -> float:
    """exp of the entropy of the normalised singular values of the stacked updates, from their Gram matrix;
    0 when every update is 0."""
    sigma = torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt()
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    q = sigma / total
    q = q[q > 0]
    return float(math.exp(-(q * q.log()).sum()))


def _upper_mean(matrix: Tensor) -> float:
    m = matrix.shape[0]
    if m < 2:
        return float("nan")
    iu = torch.triu_indices(m, m, offset=1)
    values = matrix[iu[0], iu[1]]
    values = values[~values.isnan()]
    return float(values.mean()) if len(values) else float("nan")


def weight_space(ensemble: nn.Module) -> dict:
    """Weight-space numbers of a LoraEnsemble as plain Python values:
    "cosine" (M, M) and "mean_cosine" (over pairs) of the whole-model updates, "effective_rank" of the stacked
    whole-model updates, "update_norms" (M,) = ||dW_m||_F over the model, and "layers": per adapted projection
    {"cosine", "mean_cosine", "effective_rank", "update_norms"}."""
    layers = adapted_layers(ensemble)
    if not layers:
        raise ValueError("weight_space needs a LoraEnsemble with adapted projections; this module has none")
    per_layer, total = {}, None
    for name, layer in layers.items():
        gram = update_gram(layer)
        total = gram if total is None else total + gram
        cos = cosine_from_gram(gram)
        per_layer[name] = {"cosine": cos.tolist(), "mean_cosine": _upper_mean(cos), "effective_rank": effective_rank(gram),
                           "update_norms": gram.diagonal().clamp_min(0).sqrt().tolist()}
    cos = cosine_from_gram(total)
    return {"cosine": cos.tolist(), "mean_cosine": _upper_mean(cos), "effective_rank": effective_rank(total),
            "update_norms": total.diagonal().clamp_min(0).sqrt().tolist(), "layers": per_layer}
