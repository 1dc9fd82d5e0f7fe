"""Representation similarity of the members: linear CKA between their pooled features at every adapted block.

Linear CKA (Kornblith et al. 2019) of features X (N, d1), Y (N, d2) of the same N inputs, with columns centred
(X <- X - 1/N 1 1^T X):

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)          in [0, 1]

It is invariant to orthogonal transformations and isotropic scaling of either feature space, so two members that
compute the same features in a rotated basis still score 1. Per block the result is an (M, M) matrix.

Features come from forward hooks on the blocks that hold adapted projections: a block's output (M*B, T, E)
(member-major rows, as every LoRA-Ensemble module sees them) is pooled over its token axes, with the batch's
attention mask where one is given (mean over the unmasked tokens), into (M, B, E).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.analysis.connectivity import call
from lora_ensemble.core.batch import output_tensor
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.targets import block_names


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of features x (N, d1) and y (N, d2) (float64; column-centred here). 1.0 when both are
    constant (no variance to compare), 0.0 when only one is."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs features (N, d1) and (N, d2) of the same N, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x - x.mean(dim=0, keepdim=True), y - y.mean(dim=0, keepdim=True)
    nx, ny = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / (nx * ny))


def cka_matrix(features: Tensor) -> Tensor:
    """(M, M) linear CKA between the members' features (M, N, D); diagonal 1."""
    m = features.shape[0]
    out = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = linear_cka(features[i], features[j])
    return out


def adapted_blocks(ensemble: LoraEnsemble) -> list[str]:
    """The blocks (e.g. 'encoder.layer.3') of the ensemble's model that hold an adapted projection, in order."""
    return [b for b in block_names(ensemble.model) if any(t.startswith(b + ".") for t in ensemble.target_names)]


def _pool(h: Tensor, num_members: int, mask: Tensor | None) -> Tensor:
    """(M*B, [T ...,] E) member-major -> (M, B, E): mean over the token axes (masked by mask (B, T) if given)."""
    if h.shape[0] % num_members:
        raise ValueError(f"a block returned {h.shape[0]} rows, not a multiple of the {num_members} members "
                         "(sequence-first blocks are not supported by the CKA hooks)")
    h = h.detach().float().reshape(num_members, h.shape[0] // num_members, *h.shape[1:])   # (M, B, ..., E)
    if h.dim() == 3:
        return h
    if mask is not None and h.dim() == 4 and tuple(mask.shape) == tuple(h.shape[1:3]):
        w = mask.to(h.dtype).to(h.device)[None, :, :, None]                             # (1, B, T, 1)
        return (h * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)
    return h.flatten(2, -2).mean(dim=2)


class BlockFeatures:
    """Records the pooled features of the given blocks while the ensemble runs (use as a context manager);
    `features()` gives {block: (M, N, E)} over every recorded batch. Call `set_mask(attention_mask)` before a
    batch to pool over its real tokens only."""

    def __init__(self, ensemble: LoraEnsemble, blocks: list[str] | None = None):
        self.ensemble, self.blocks = ensemble, adapted_blocks(ensemble) if blocks is None else list(blocks)
        if not self.blocks:
            raise ValueError("this LoraEnsemble has no adapted block (targets inside repeated blocks) to compare")
        self._store: dict[str, list[Tensor]] = {b: [] for b in self.blocks}
        self._mask: Tensor | None = None
        self._handles: list[Any] = []

    def set_mask(self, mask: Tensor | None) -> None:
        self._mask = mask

    def _hook(self, block: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store[block].append(_pool(output_tensor(output), self.ensemble.num_members, self._mask).cpu())
        return hook

    def __enter__(self) -> BlockFeatures:  # noqa: PYI034
        for b in self.blocks:
            self._handles.append(self.ensemble.model.get_submodule(b).register_forward_hook(self._hook(b)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def features(self) -> dict[str, Tensor]:
        return {b: torch.cat(parts, dim=1) for b, parts in self._store.items() if parts}


def member_logits_and_features(ensemble: LoraEnsemble, batches: Iterable[tuple[Mapping[str, Any], Tensor]],
                               blocks: list[str] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One pass over `batches` ((inputs: keyword dict or positional tuple, labels (B,))): member logits (M, N, C), labels (N,) and the pooled
    features {block: (M, N, E)} of every adapted block."""
    logits, labels = [], []
    with torch.no_grad(), BlockFeatures(ensemble, blocks) as recorder:
        for inputs, y in batches:
            recorder.set_mask(inputs.get("attention_mask") if isinstance(inputs, Mapping) else None)
            logits.append(call(ensemble, inputs).float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    if not logits:
        raise ValueError("member_logits_and_features got no data batches")
    return torch.cat(logits, dim=1), torch.cat(labels), recorder.features()


def representation_similarity(features: Mapping[str, Tensor]) -> dict[str, Any]:
    """{"blocks": {block: (M, M) CKA}, "mean_cka": {block: mean over pairs}} from {block: (M, N, E)}."""
    out: dict[str, Any] = {"blocks": {}, "mean_cka": {}}
    for block, f in features.items():
        cka = cka_matrix(f)
        m = cka.shape[0]
        iu = torch.triu_indices(m, m, offset=1)
        out["blocks"][block] = cka.tolist()
        out["mean_cka"][block] = float(cka[iu[0], iu[1]].mean()) if m > 1 else 1.0
    return out
