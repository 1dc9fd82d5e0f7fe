"""Function-space diversity: how differently the members predict, pair by pair, from member logits (M, N, C).

    disagreement[i, j] = 1/N sum_n 1[argmax z_i,n != argmax z_j,n]                        (M, M), symmetric
    kl[i, j]           = 1/N sum_n KL(p_i,n || p_j,n),  p = softmax(z)                      (M, M), directed
    js[i, j]           = 1/N sum_n JS(p_i,n, p_j,n)                                          (M, M), in [0, log 2]
    error_corr[i, j]   = Pearson correlation of the 0/1 error vectors 1[argmax z_i != y]    (M, M)

The diversity-accuracy plane of Fort et al. 2019 ("Deep Ensembles: A Loss Landscape Perspective") has one point
per member pair (i < j): x = the pair's accuracy a_ij = (acc_i + acc_j) / 2, y = the normalised disagreement
disagreement[i, j] / (1 - a_ij) (Fort et al. normalise by the reference solution's error rate; with no reference
member both members' mean is used). Two members that err on disjoint samples reach y = 2; identical ones y = 0.

Per-class disagreement[c] = mean over pairs and over the samples of true class c of the pair's disagreement.

The pairwise entries reuse `lora_ensemble.metrics.diversity` on each pair, so the means over pairs equal
`metrics.diversity(...)` (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lora_ensemble.metrics._checks import check_labels, check_member_logits
from lora_ensemble.metrics.diversity import (
    diversity,
    error_correlation,
    member_metrics,
    pairwise_disagreement,
    pairwise_js,
)
from lora_ensemble.metrics.predictive import pairwise_argmax_disagreement


def _pairwise(z: Tensor, value) -> Tensor:
    """(M, M) float64 matrix, value(i, j) on the upper triangle mirrored below; zero diagonal."""
    m = z.shape[0]
    out = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = value(i, j)
    return out


def disagreement_matrix(member_logits: Any) -> Tensor:
    """(M, M): fraction of samples on which members i and j predict different classes (argmax)."""
    z = check_member_logits(member_logits)
    return _pairwise(z, lambda i, j: pairwise_disagreement(z[[i, j]]))


def kl_matrix(member_logits: Any) -> Tensor:
    """(M, M): kl[i, j] = mean over samples of KL(p_i || p_j) in nats (directed; zero diagonal). Computed from
    log_softmax; the mean of its off-diagonal entries is `metrics.pairwise_kl`."""
    z = check_member_logits(member_logits)
    logp = torch.log_softmax(z, dim=-1)                                     # (M, N, C)
    p = logp.exp()
    # kl[i, j] = 1/N sum_n sum_c p_i (log p_i - log p_j)
    neg_entropy = (p * logp).sum(dim=-1).mean(dim=1)                       # (M,)  1/N sum p_i log p_i
    cross = torch.einsum("inc,jnc->ij", p, logp) / z.shape[1]             # (M, M) 1/N sum p_i log p_j
    kl = neg_entropy[:, None] - cross
    kl.fill_diagonal_(0.0)
    return kl.clamp_min(0.0)


def js_matrix(member_logits: Any) -> Tensor:
    """(M, M): mean over samples of the Jensen-Shannon divergence of members i and j (nats, symmetric)."""
    z = check_member_logits(member_logits)
    return _pairwise(z, lambda i, j: pairwise_js(z[[i, j]]))


def error_correlation_matrix(member_logits: Any, labels: Any) -> Tensor:
    """(M, M): Pearson correlation of the members' 0/1 error vectors (a pair with a constant error vector: 0);
    diagonal 1."""
    z = check_member_logits(member_logits)
    out = _pairwise(z, lambda i, j: error_correlation(z[[i, j]], labels))
    out.fill_diagonal_(1.0)
    return out


def diversity_accuracy_plane(member_logits: Any, labels: Any) -> list[dict[str, float]]:
    """One point per member pair i < j: {"i", "j", "accuracy": (acc_i + acc_j) / 2,
    "disagreement", "normalized_disagreement": disagreement / (1 - accuracy)} (NaN when accuracy is 1)."""
    z = check_member_logits(member_logits)
    acc = member_metrics(z, labels)["acc"]
    d = disagreement_matrix(z)
    points = []
    for i in range(z.shape[0]):
        for j in range(i + 1, z.shape[0]):
            a = (acc[i] + acc[j]) / 2
            points.append({"i": i, "j": j, "accuracy": a, "disagreement": float(d[i, j]),
                           "normalized_disagreement": float(d[i, j]) / (1 - a) if a < 1 else float("nan")})
    return points


def per_class_disagreement(member_logits: Any, labels: Any) -> Tensor:
    """(C,): mean over member pairs and over the samples whose true class is c of the pairs' disagreement
    (NaN for a class without samples)."""
    z = check_member_logits(member_logits)
    _, n, c = z.shape
    y = check_labels(labels, n, c, z.device)
    per_sample = pairwise_argmax_disagreement(z.argmax(dim=-1), c)        # (N,)
    counts = torch.bincount(y, minlength=c).to(torch.float64)
    sums = torch.zeros(c, dtype=torch.float64, device=z.device).index_add_(0, y, per_sample)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan"))).cpu()


def function_space(member_logits: Any, labels: Any) -> dict[str, Any]:
    """Every function-space number for member logits (M, N, C) and labels (N,), as plain Python values:
    the means of `metrics.diversity` ("disagreement", "kl", "js", "error_corr"), each member's "acc" and "nll",
    the (M, M) matrices ("disagreement_matrix", "kl_matrix", "js_matrix", "error_corr_matrix"), the
    diversity-accuracy plane ("plane": one point per pair, and its mean "normalized_disagreement") and
    "per_class_disagreement" (C,)."""
    z = check_member_logits(member_logits)
    plane = diversity_accuracy_plane(z, labels)
    finite = [p["normalized_disagreement"] for p in plane if p["normalized_disagreement"] == p["normalized_disagreement"]]
    return {
        "num_members": z.shape[0],
        "num_samples": z.shape[1],
        **diversity(z, labels),
        "members": member_metrics(z, labels),
        "normalized_disagreement": sum(finite) / len(finite) if finite else 0.0,
        "disagreement_matrix": disagreement_matrix(z).tolist(),
        "kl_matrix": kl_matrix(z).tolist(),
        "js_matrix": js_matrix(z).tolist(),
        "error_corr_matrix": error_correlation_matrix(z, labels).tolist(),
        "plane": plane,
        "per_class_disagreement": per_class_disagreement(z, labels).tolist(),
    }
