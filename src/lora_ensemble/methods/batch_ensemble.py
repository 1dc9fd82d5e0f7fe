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
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoraEnsembleConfig
from ..batch import MemberModule, RowContract, batch_size_of, output_tensor, repeat_batch
from ..ensemble import bind_member_modules, set_submodule
from ..heads import stack_head
from ..layers import adapter_dtype
from ..targets import find_heads, find_targets

INITS = ("gaussian", "random_sign", "ones")


class BatchEnsembleLinear(MemberModule):
    """A frozen nn.Linear with M rank-1 fast weights: r (M, in), s (M, out), bias (M, out).
    Input (M*B, ..., in) -> output (M*B, ..., out), member-major rows."""

    def __init__(self, base_layer: nn.Linear, num_members: int, init: str = "gaussian", init_std: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.num_members = num_members
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        r = _draw((num_members, self.in_features), init, init_std, generator)
        s = _draw((num_members, self.out_features), init, init_std, generator)
        bias = base_layer.bias.detach() if base_layer.bias is not None else w.new_zeros(self.out_features)
        dtype = adapter_dtype(w.dtype)
        self.r = nn.Parameter(r.to(device=w.device, dtype=dtype))
        self.s = nn.Parameter(s.to(device=w.device, dtype=dtype))
        self.bias = nn.Parameter(bias.to(dtype).expand(num_members, -1).clone())

    def forward(self, x: Tensor) -> Tensor:
        M = self.num_members
        return self.run_member_major(x, self.forward_member_major)

    def forward_member_major(self, x: Tensor) -> Tensor:
        """x: (M*B, ..., in) member-major on dimension 0."""
        M = self.num_members
        h = x.reshape(M, -1, self.in_features) * self.r.to(x.dtype).unsqueeze(1)        # (M, N, in)
        y = F.linear(h, self.base_layer.weight)                                          # (M, N, out), shared W
        y = torch.addcmul(self.bias.to(y.dtype).unsqueeze(1), y, self.s.to(y.dtype).unsqueeze(1))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


def _draw(shape: tuple[int, int], init: str, std: float, generator: torch.Generator | None) -> Tensor:
    if init == "ones":
        return torch.ones(shape)
    if init == "gaussian":
        return torch.empty(shape).normal_(1.0, std, generator=generator)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1      # random_sign


class BatchEnsemble(nn.Module):
    """M BatchEnsemble members on the frozen `model` (modified in place: targets wrapped, heads stacked)."""

    def __init__(self, model: nn.Module, num_members: int = 4, target_modules: str | list[str] = "qkvo",
                 layers: list[int] | None = None, head: str | list[str] | None = "auto", head_init: str = "random",
                 init: str = "gaussian", init_std: float = 0.1, seed: int = 0):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
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

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Inputs as for `model` (batch B); output (M, B, ...)."""
        M = self.num_members
        source, batch_size = batch_size_of(args, kwargs)
        self.row_contract.open(M * batch_size, owner="BatchEnsemble")
        try:
            args, kwargs = repeat_batch(args, kwargs, batch_size, M, source=source)
            out = output_tensor(self.model(*args, **kwargs))
        finally:
            self.row_contract.close()
        if out.shape[0] != M * batch_size:
            raise ValueError(f"the model returned {out.shape[0]} rows for {M} members x batch {batch_size}")
        return out.view(M, batch_size, *out.shape[1:])
