"""Checks on a finished run's predictions that a user should hear about before trusting its numbers.

`prediction_collapse` finds a model that predicts (nearly) one class for everything while the labels are
not one class: on small, imbalanced data a run can learn only the class prior (every prediction the
majority class, NLL = the prior's entropy) and still report the majority share as its accuracy.
`collapse_warning` warns about it in one line. See docs/small_data.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

COLLAPSE_THRESHOLD = 0.95


class PredictionCollapseWarning(UserWarning):
    """The predictions of a run fell (nearly) all into one class while its labels did not."""


def _predicted_classes(predictions: Any) -> Tensor:
    """(N,) class indices from member logits (M, N, C) (argmax of p = 1/M sum_m softmax(z_m)), logits or
    probabilities (N, C) (argmax), or class indices (N,)."""
    p = torch.as_tensor(predictions)
    if p.dim() == 3:
        return torch.softmax(p.float(), dim=-1).mean(0).argmax(-1)
    if p.dim() == 2:
        return p.argmax(-1)
    if p.dim() == 1 and not p.is_floating_point():
        return p.long()
    raise ValueError(f"predictions must be member logits (M, N, C), scores (N, C) or class indices (N,), "
                     f"got shape {tuple(p.shape)} of {p.dtype}")


def prediction_collapse(predictions: Any, labels: Any, class_names: Sequence[str] | None = None,
                        threshold: float = COLLAPSE_THRESHOLD) -> dict[str, Any]:
    """Whether a share >= `threshold` of the predictions is one class while that class's share of `labels` is
    below `threshold`.

    predictions: member logits (M, N, C), scores (N, C) or class indices (N,); labels: (N,) class indices.
    Returns {"collapsed": bool, "class": name (or index as str) of the most predicted class,
    "fraction": its share of the predictions, "label_fraction": its share of the labels, "n": N}.
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    pred = _predicted_classes(predictions)
    y = torch.as_tensor(labels).long().reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.numel()} predictions but {y.numel()} labels; they must be as many")
    if (y < 0).any() or (pred < 0).any():
        raise ValueError("labels and predicted classes must be class indices >= 0 (OOD rows have no class)")
    n = int(y.numel())
    if n == 0:
        return {"collapsed": False, "class": None, "fraction": 0.0, "label_fraction": 0.0, "n": 0}
    counts = torch.bincount(pred, minlength=int(max(pred.max(), y.max())) + 1)
    top = int(counts.argmax())
    fraction = float(counts[top]) / n
    label_fraction = float((y == top).sum()) / n
    labels_one_class = float(torch.bincount(y).max()) / n >= threshold
    name = class_names[top] if class_names is not None and top < len(class_names) else str(top)
    return {"collapsed": fraction >= threshold and not labels_one_class, "class": name, "fraction": fraction,
            "label_fraction": label_fraction, "n": n}


def collapse_warning(predictions: Any, labels: Any, class_names: Sequence[str] | None = None,
                     threshold: float = COLLAPSE_THRESHOLD, split: str = "test", warn: bool = True) -> dict[str, Any]:
    """`prediction_collapse(...)`, and (unless `warn` is false, e.g. on DDP ranks other than 0) a one-line
    `PredictionCollapseWarning` naming the class and the fraction when the predictions collapsed."""
    info = prediction_collapse(predictions, labels, class_names, threshold)
    if info["collapsed"] and warn:
        warnings.warn(
            f"{info['fraction']:.1%} of the {info['n']} {split} predictions are class {info['class']!r} "
            f"(its share of the {split} labels: {info['label_fraction']:.1%}): the model learned little more than "
            "the class prior; see docs/small_data.md for settings that learn on small, imbalanced data",
            PredictionCollapseWarning, stacklevel=2)
    return info
