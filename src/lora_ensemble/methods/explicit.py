"""`explicit`: a deep ensemble of M fully fine-tuned copies of the model, each with its own head.

Every parameter and buffer t of the model is stored once, stacked over members: t_stacked (M, ...), member m's
copy being t_stacked[m]. The model object is kept as the skeleton the members run through:

    out[m] = functional_call(model, {name: t_stacked[m]}, x)        -> member logits (M, B, C)

run as one `torch.func.vmap` over m where the model allows it, else as a loop over m (found on the first call
and remembered, see `_stacked.StackedCall`; `vectorize=` forces either). Checkpoints carry the members under
the model's own names with a leading dimension M.

Initialisation: every member starts from the pretrained weights; member m's head (the modules `find_heads`
resolves) is re-drawn by its modules' `reset_parameters()` under seed `seed + m` (head_init='random'), or kept
as the pretrained head (head_init='copy').
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.core.batch import check_num_members
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.targets import find_heads
from lora_ensemble.methods._stacked import StackedCall, forked_rng


class ExplicitEnsemble(nn.Module):
    """M independent full copies of `model` (modified in place: its tensors become stacked (M, ...))."""

    def __init__(self, model: nn.Module, num_members: int = 4, head: str | list[str] | None = "auto",
                 head_init: str = "random", seed: int = 0, vectorize: bool | None = None):
        super().__init__()
        check_num_members(num_members)
        if head_init not in ("random", "copy"):
            raise ValueError(f"head_init must be 'random' or 'copy', got {head_init!r}")
        self.num_members = num_members
        self.head_names = find_heads(model, LoraEnsembleConfig(head=head))
        if not self.head_names or head_init == "copy":
            warnings.warn(
                f"explicit: {'no head found' if not self.head_names else 'head_init=copy'}, so the {num_members} "
                "members start as identical copies and differ only through dropout during training; name a "
                "head (head='...') with head_init='random' for independently initialised members",
                stacklevel=2,
            )
        heads = [_draw_heads(model.get_submodule(h), h, num_members, head_init, seed) for h in self.head_names]
        _stack_in_place(model, num_members)
        with torch.no_grad():
            for name, draws in zip(self.head_names, heads):
                for key, value in draws.items():
                    model.get_submodule(name).get_parameter(key).copy_(value)
        self.model = model
        self.call = StackedCall(vectorize, owner="explicit")

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Inputs as for `model` (batch B, not repeated); output (M, B, ...)."""
        stacked = dict(self.model.named_parameters())
        stacked.update(self.model.named_buffers())
        return self.call(self.model, stacked, args, kwargs)

    def member(self, m: int) -> nn.Module:
        """Member m as a standalone model of the original class."""
        if not isinstance(m, int) or not 0 <= m < self.num_members:
            raise IndexError(f"member index must be an integer in 0..{self.num_members - 1}, got {m!r}")
        standalone = copy.deepcopy(self.model)
        done: dict[int, Tensor] = {}  # tied tensors stay tied
        for module in standalone.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for key, t in table.items():
                    if t is not None:
                        if id(t) not in done:
                            value = t.detach()[m].clone()
                            done[id(t)] = nn.Parameter(value) if is_param else value
                        table[key] = done[id(t)]
        return standalone


def _draw_heads(head: nn.Module, name: str, num_members: int, head_init: str, seed: int) -> dict[str, Tensor]:
    """Member heads stacked: {parameter name inside `head`: (M, ...)}; member m redrawn under seed + m."""
    draws: list[dict[str, Tensor]] = []
    for m in range(num_members):
        fresh = copy.deepcopy(head)
        if head_init == "random":
            with forked_rng(seed + m, [p.device for p in head.parameters()]):
                for sub_name, sub in fresh.named_modules():
                    own = any(True for _ in sub.parameters(recurse=False))
                    if own and not hasattr(sub, "reset_parameters"):
                        raise ValueError(
                            f"cannot re-draw head {name!r}: its {type(sub).__name__} {sub_name!r} has no "
                            "reset_parameters(); pass head_init='copy' or name another head"
                        )
                    if own:
                        sub.reset_parameters()
        draws.append({k: p.detach() for k, p in fresh.named_parameters()})
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _stack_in_place(model: nn.Module, num_members: int) -> None:
    """Replace every parameter (trainable) and buffer of `model` by an (M, ...) stack of copies; tied tensors
    stay tied (one stacked tensor for all their names)."""
    new: dict[int, Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for key, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    stacked = t.detach().unsqueeze(0).repeat(num_members, *([1] * t.dim())).contiguous()
                    new[id(t)] = nn.Parameter(stacked, requires_grad=True) if is_param else stacked
                table[key] = new[id(t)]
