"""`single`: one model, fully fine-tuned (every parameter trainable); M = 1.

    logits = model(x)            -> member logits (1, B, C)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lora_ensemble.methods._stacked import single_output


class SingleModel(nn.Module):
    """The plain fine-tuning baseline: `model` with all parameters trainable, output (1, B, ...)."""

    num_members = 1

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return single_output(self.model, args, kwargs)


def build(model: nn.Module, num_members: int = 1) -> SingleModel:
    """`num_members` is ignored: a single model has M = 1."""
    return SingleModel(model)
