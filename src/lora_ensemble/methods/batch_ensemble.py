"""`batch_ensemble`: BatchEnsemble (Wen et al. 2020) on a frozen pretrained backbone: rank-1 fast weights on the
projections LoRA-Ensemble adapts, per-member heads, the batch repeated member-major (M*B rows).

Member m's projection W (out x in, frozen) becomes W * (s_m r_m^T), computed without forming it:

    y[m] = ((x[m] * r[m]) @ W^T) * s[m] + b[m]        r: (M, in), s: (M, out), b: (M, out)   x[m]: (N, in)

so the frozen matmul runs once over all M*B rows. Initialisation keeps the pretrained function at the start
(exactly with init='ones'; up to the spread of the draw otherwise):
  * 'gaussian' (default): r, s ~ N(1, init_std^2), init_std = 0.1, every member its own draw;
  * 'random_sign': r, s entries +-1 with probability 1/2 (Wen et al.'s option; changes the function);
  * 'ones': r = s = 1 (members differ only through their heads at the start).
b starts at the pretrained bias (zeros when the projection has none). Heads: `stack_head`, 'random' or 'copy'.
Targets are resolved as for LoRA-Ensemble (`target_modules`, `layers`, `head`); nn.Linear targets only, a
fused q/k/v projection counting as one Linear (all of q, k and v get fast weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.core.batch import RowContract, run_members
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import bind_member_modules, set_submodule, standalone_member
from lora_ensemble.core.heads import stack_head
from lora_ensemble.core.layers import FAST_WEIGHT_INITS, BatchEnsembleLinear
from lora_ensemble.core.targets import find_heads, find_targets


class BatchEnsemble(nn.Module):
    """M BatchEnsemble members on the frozen `model` (modified in place: targets wrapped, heads stacked)."""

    def __init__(self, model: nn.Module, num_members: int = 4, target_modules: str | list[str] = "qkvo",
                 layers: list[int] | None = None, head: str | list[str] | None = "auto", head_init: str = "random",
                 init: str = "gaussian", init_std: float = 0.1, seed: int = 0):
        super().__init__()
        if init not in FAST_WEIGHT_INITS:
            raise ValueError(f"init must be one of {list(FAST_WEIGHT_INITS)}, got {init!r}")
        if not isinstance(init_std, (int, float)) or init_std < 0:
            raise ValueError(f"init_std must be a number >= 0, got {init_std!r}")
        config = LoraEnsembleConfig(num_members=num_members, target_modules=target_modules, layers=layers,
                                    head=head, head_init=head_init, seed=seed)
        heads = find_heads(model, config)
        targets = find_targets(model, config, heads)
        unsupported = [f"{t.name} ({type(t.module).__name__})" for t in targets if type(t.module) is not nn.Linear]
        if unsupported:
            raise ValueError(
                f"batch_ensemble supports nn.Linear projections only (a fused q/k/v Linear counts as one); "
                f"{type(model).__name__} has {unsupported[:4]}. Use lora_ensemble or explicit for this model"
            )
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        for t in targets:
            set_submodule(model, t.name, BatchEnsembleLinear(t.module, num_members, init, init_std, generator))
        for name in heads:
            set_submodule(model, name, stack_head(model.get_submodule(name), num_members, head_init, generator, name))
        self.model, self.num_members = model, num_members
        self.target_names, self.head_names = [t.name for t in targets], heads
        self.row_contract = RowContract(num_members)
        bind_member_modules(model, self.row_contract)

    def member(self, m: int) -> nn.Module:
        """A standalone model of the wrapped model's class with member m's fast weights folded into its weights
        (W * s_m r_m^T, bias b_m) and member m's head; `be.member(m)(x)` equals `be(x)[m]` to float tolerance."""
        return standalone_member(self.model, self.head_names, self.num_members, m)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Inputs as for `model` (batch B); output (M, B, ...)."""
        return run_members(self.model, args, kwargs, self.num_members, self.row_contract, owner="BatchEnsemble")
