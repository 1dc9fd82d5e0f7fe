"""Losses on member logits (M, B, C), importable without Lightning.

    member_cross_entropy(z, y) = 1/M sum_m CE(z_m, y)      (the paper's loss; reduction="sum" drops the 1/M)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LABELS = "labels"



def member_cross_entropy(member_logits: Tensor, labels: Tensor, reduction: str = "mean",
                         class_weights: Tensor | None = None) -> Tensor:
    """Mean (or sum) over members of each member's cross-entropy.

    member_logits: (M, B, C); labels: (B,). With class weights, each member's CE is the weighted mean
    sum_i w_{y_i} CE_i / sum_i w_{y_i}, as `F.cross_entropy(weight=...)`.
    """
    if member_logits.dim() != 3:
        raise ValueError(f"member logits must have shape (M, B, C), got {tuple(member_logits.shape)}")
    M, B, C = member_logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match member logits {tuple(member_logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    weight = None if class_weights is None else class_weights.to(member_logits.device, torch.float32)
    ce = F.cross_entropy(member_logits.reshape(M * B, C).float(), labels.repeat(M), weight=weight,
                         reduction="none").view(M, B)                           # (M, B), already weighted
    norm = B if weight is None else weight[labels].sum()                        # each member's weight total
    per_member = ce.sum(dim=1) / norm                                           # (M,)
    return per_member.mean() if reduction == "mean" else per_member.sum()

