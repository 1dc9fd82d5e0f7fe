"""Vectorized LoRA-Ensemble layers: one frozen weight, M stacked low-rank adapters.

Every layer here receives member-major rows: member m owns rows m*B .. (m+1)*B-1 of its member axis
(M*B in all; the leading dimension, or dimension 1 inside a sequence-first nn.Transformer* block), and checks
their number against its owner's row contract (`batch.RowContract`). The frozen base projection runs ONCE over all M*B rows; the per-member
low-rank deltas run as batched matmuls over parameters stacked with leading dimension M:

    y[m] = base(x[m]) + s * (dropout(x[m]) @ A[m]^T) @ B[m]^T        x[m]: (N, in), A: (M, r, in), B: (M, out, r)

so the frozen weights exist once in memory and no Python loop runs over members. Three fast paths give
the same result (tested against the generic one):
- inference (no autograd): the deltas are added into the frozen output in place, so y is not copied;
- training with a plain frozen nn.Linear: `_LinearWithMemberDeltas` does the same in forward and adds the
  members' input gradient into the frozen one in place in backward;
- an input that repeats B rows member-major (the first adapted block of a shared trunk, marked by
  `RowContract.mark_repeat`): the frozen matmul runs once on the B rows and the member deltas broadcast over it.

Per-member parameters are kept in float32 when the frozen weights are fp16/bf16 (`adapter_dtype`), as PEFT
does: AdamW updates of ~1e-4 would vanish in bf16 rounding. The forward casts them to the input's dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ensemble.core.batch import MemberModule

PART_INDEX = {"q": 0, "k": 1, "v": 2}


class InProjection(nn.Module):
    """The fused in-projection of an nn.MultiheadAttention as a Linear-like module (weight (3E, E))."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None.

    Linear-like: `nn.Linear` and `InProjection` (weight (out, in)) and GPT-2's `Conv1D`
    (weight (in, out), attribute `nf`).
    """
    if isinstance(module, (nn.Linear, InProjection)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `transformers.pytorch_utils.Conv1D` (GPT-2), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-member parameters are kept in for frozen weights of `dtype`: float32 unless the weights
    are float32 or float64 (half precision and integer/quantized weights get float32 adapters)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _repeat_source(layer: MemberModule, x: Tensor) -> Tensor | None:
    contract = layer.row_contract
    return None if contract is None else contract.repeat_source(x)


def _frozen_part(layer: MemberModule, x: Tensor) -> Tensor:
    """layer.base_layer(x) as (M, N, out); when x repeats a B-row tensor member-major (the first adapted block
    of a shared trunk, marked on the row contract), the frozen matmul runs once on those B rows and comes back
    as (1, N, out), which the member deltas broadcast over."""
    source = _repeat_source(layer, x)
    if source is None:
        y = layer.base_layer(x)
        return y.reshape(layer.num_members, -1, y.shape[-1])
    y = layer.base_layer(source)
    return y.reshape(1, -1, y.shape[-1])


def _in_place(y: Tensor, num_members: int) -> bool:
    """Whether the member deltas may be added into the frozen output y in place: only without autograd (in
    training, an in-place add to a view of y would make autograd copy the gradient instead) and when y holds
    every member's rows (not the (1, N, out) output that the members share)."""
    return not torch.is_grad_enabled() and y.shape[0] == num_members


def _fused_training(layer: nn.Module, x: Tensor) -> bool:
    """Whether this training step of `layer` can use `_LinearWithMemberDeltas`: autograd on, a frozen plain
    nn.Linear (not a subclass such as a quantized layer, and without hooks, since the function calls F.linear
    on its weight), no LoRA dropout, no autocast (its backward would not see the forward's dtypes), and an
    input that is not shared across members."""
    base = layer.base_layer
    return (torch.is_grad_enabled() and type(base) in (nn.Linear, InProjection)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and isinstance(layer.lora_dropout, nn.Identity) and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == base.weight.dtype == layer.lora_A.dtype and _repeat_source(layer, x) is None)


def init_lora_A(A: Tensor, init: str, gain: float, std: float | None, generator: torch.Generator) -> None:
    """Fill A (..., r, in) in place, every member its own draw from `generator`.

    xavier_uniform: U(-b, b), b = gain * sqrt(6 / (in + r))         (the paper: gain 10)
    kaiming_uniform: U(-b, b), b = 1 / sqrt(in)                     (PEFT's default, a = sqrt(5))
    gaussian: N(0, std^2), std = 1 / r by default                    (PEFT's "gaussian")
    """
    r, fan_in = A.shape[-2], A.shape[-1]
    draw = torch.empty(A.shape, dtype=torch.float32)
    if init == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (fan_in + r))
        draw.uniform_(-bound, bound, generator=generator)
    elif init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(fan_in)
        draw.uniform_(-bound, bound, generator=generator)
    elif init == "gaussian":
        draw.normal_(0.0, std if std is not None else 1.0 / r, generator=generator)
    else:  # validated by the config; kept for direct callers
        raise ValueError(f"unknown init {init!r}")
    with torch.no_grad():
        A.copy_(draw)


class LoraEnsembleLinear(MemberModule):
    """A frozen linear-like layer (nn.Linear or Conv1D) plus M stacked LoRA adapters.

    Parameters: lora_A (M, r, in), lora_B (M, out, r). Input (M*B, ..., in) -> output (M*B, ..., out).
    """

    def __init__(self, base_layer: nn.Module, num_members: int, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"LoraEnsembleLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.in_features, self.out_features = features
        self.base_layer = base_layer
        self.num_members, self.r, self.scaling = num_members, r, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w, dtype = base_layer.weight, adapter_dtype(base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(num_members, r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_members, self.out_features, r, device=w.device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.run_member_major(x, self._forward)

    def _forward(self, x: Tensor) -> Tensor:  # x: (M*B, ..., in), member-major on dimension 0
        M = self.num_members
        if _fused_training(self, x):                                  # same result, fewer full-size tensors
            y = _LinearWithMemberDeltas.apply(x.reshape(-1, self.in_features), self.base_layer.weight,
                                              self.base_layer.bias, self.lora_A.unsqueeze(1),
                                              self.lora_B.unsqueeze(1), self.scaling, M, (0,), 1)
            return y.view(*x.shape[:-1], self.out_features)
        y = _frozen_part(self, x)                                     # (M or 1, N, out): one shared matmul
        h = self.lora_dropout(x).reshape(M, -1, self.in_features)     # (M, N, in)
        h = torch.bmm(h, self.lora_A.to(h.dtype).transpose(1, 2))     # (M, N, r)
        B = self.lora_B.to(h.dtype).transpose(1, 2)                   # (M, r, out)
        if _in_place(y, M):                                           # y += s * h @ B^T, no copy of y
            y = y.baddbmm_(h, B, alpha=self.scaling)
        else:                                                         # (M, N, out) = y + s * h @ B^T
            y = torch.baddbmm(y, h, B, alpha=self.scaling)
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self, m: int) -> Tensor:
        """s * B[m] A[m]: (out, in), member m's change to the frozen weight in nn.Linear's layout."""
        return self.scaling * (self.lora_B[m] @ self.lora_A[m])

    def member_module(self, m: int) -> nn.Module:
        """A standalone copy of the base layer with member m's adapter merged into its weight."""
        merged = copy.deepcopy(self.base_layer)
        delta = self.delta_weight(m).detach()
        with torch.no_grad():
            merged.weight += delta.T if is_conv1d(merged) else delta
        return merged

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, r={self.r}, scaling={self.scaling}"


class _LinearWithMemberDeltas(torch.autograd.Function):
    """y = x W^T + b with W, b frozen, plus each member's low-rank delta, as one tensor.

    x: (M*n, in) member-major. y's columns are K equal slices of width d (K = 1 for a plain projection, K = 3
    for a fused q/k/v one); slice `slices[p]` gets adapter p: A (M, P, r, in), B (M, P, d, r). For member m:

        h_p = x_m A_{m,p}^T (n, r);  y_m[:, slice p] += s h_p B_{m,p}^T
        g_p = s g_m[:, slice p] B_{m,p};  dA_{m,p} = g_p^T x_m;  dB_{m,p} = s g_m[:, slice p]^T h_p
        dx_m = g_m W + sum_p g_p A_{m,p}

    Forward adds the deltas into the frozen output in place; backward adds the members' share into the frozen
    layer's input gradient g W in place. So a training step allocates no full-size (M*n, out) or (M*n, in)
    tensor beyond those the frozen layer alone needs (autograd's generic path writes the delta or a copy of
    y, and sums two input gradients).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                num_members: int, slices: tuple[int, ...], num_slices: int) -> Tensor:
        M, P, d, r = num_members, B.shape[1], B.shape[2], B.shape[3]
        y = F.linear(x, weight, bias)                                      # (M*n, K*d)
        h = torch.bmm(x.view(M, -1, x.shape[-1]), A.reshape(M, P * r, -1).transpose(1, 2))  # (M, n, P*r)
        y_slices = y.view(M, -1, num_slices, d)                            # (M, n, K, d)
        for p, k in enumerate(slices):
            y_slices[:, :, k].baddbmm_(h[:, :, p * r:(p + 1) * r], B[:, p].transpose(1, 2), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scaling, ctx.num_members, ctx.slices, ctx.num_slices = scaling, M, slices, num_slices
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, h = ctx.saved_tensors
        M, s, P, d, r = ctx.num_members, ctx.scaling, B.shape[1], B.shape[2], B.shape[3]
        g_slices = g.reshape(M, -1, ctx.num_slices, d)                     # (M, n, K, d)
        g_h = torch.cat([torch.bmm(g_slices[:, :, k], B[:, p]) for p, k in enumerate(ctx.slices)], dim=-1)
        dB = torch.stack([torch.bmm(g_slices[:, :, k].transpose(1, 2), h[:, :, p * r:(p + 1) * r])
                          for p, k in enumerate(ctx.slices)], dim=1)       # (M, P, d, r)
        if s != 1.0:
            g_h, dB = g_h.mul_(s), dB.mul_(s)                              # g_h: (M, n, P*r)
        xm = x.view(M, -1, x.shape[-1])
        dA = torch.bmm(g_h.transpose(1, 2), xm).view(A.shape)              # (M, P, r, in)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(g, weight)                                   # the frozen layer's input gradient
            dx.view(M, -1, dx.shape[-1]).baddbmm_(g_h, A.reshape(M, P * r, -1))  # + the members' share, in place
        return dx, None, None, dA, dB, None, None, None, None


class LoraEnsembleFusedLinear(MemberModule):
    """A frozen fused q/k/v projection (timm `qkv`, GPT-2 `c_attn`, the in-projection of
    nn.MultiheadAttention) whose output is [q | k | v], each of width d = out / 3.

    Each chosen part p gets its own rank-r adapter, as in the paper (separate Q, K, V adapters):
    lora_A (M, P, r, in), lora_B (M, P, d, r), P = len(parts). Input (M*B, ..., in) -> (M*B, ..., 3d).
    """

    def __init__(self, base_layer: nn.Module, parts: list[str], num_members: int, r: int, scaling: float,
                 dropout: float = 0.0):
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"LoraEnsembleFusedLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.in_features, self.out_features = features
        if self.out_features % 3:
            raise ValueError(
                f"a fused q/k/v projection needs out_features divisible by 3, got {self.out_features}; "
                "name the module in target_modules as a plain linear layer instead"
            )
        self.base_layer = base_layer
        self.parts = list(parts)
        self.part_width = self.out_features // 3
        self.num_members, self.r, self.scaling = num_members, r, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.part_index = [PART_INDEX[p] for p in self.parts]  # a plain list: no buffer beyond the adapters
        w, P, dtype = base_layer.weight, len(self.parts), adapter_dtype(base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(num_members, P, r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_members, P, self.part_width, r, device=w.device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.run_member_major(x, self._forward)

    def _forward(self, x: Tensor) -> Tensor:  # x: (M*B, ..., in), member-major on dimension 0
        M, P, r, d = self.num_members, len(self.parts), self.r, self.part_width
        if _fused_training(self, x):                                   # same result, fewer full-size tensors
            y = _LinearWithMemberDeltas.apply(x.reshape(-1, self.in_features), self.base_layer.weight,
                                              self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, M,
                                              tuple(self.part_index), 3)
            return y.view(*x.shape[:-1], self.out_features)
        y = _frozen_part(self, x)                                      # (M or 1, N, 3d)
        y = y.view(y.shape[0], -1, 3, d)                               # (M or 1, N, 3, d)
        h = self.lora_dropout(x).reshape(M, -1, self.in_features)      # (M, N, in)
        A = self.lora_A.to(h.dtype).reshape(M, P * r, self.in_features)
        h = torch.bmm(h, A.transpose(1, 2)).view(M, -1, P, r)          # (M, N, P, r)
        delta = torch.einsum("mnpr,mpdr->mnpd", h, self.lora_B.to(h.dtype))  # (M, N, P, d)
        index = torch.tensor(self.part_index, device=y.device) if P < 3 else None
        if _in_place(y, M):
            y = y.add_(delta, alpha=self.scaling) if P == 3 else y.index_add_(2, index, delta, alpha=self.scaling)
        elif P == 3:
            y = torch.add(y, delta, alpha=self.scaling)
        else:
            y = y.expand(M, -1, -1, -1).index_add(2, index, delta, alpha=self.scaling)
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self, m: int) -> Tensor:
        """Member m's change to the fused weight, (3d, in) in nn.Linear's layout; zero rows for parts
        without an adapter."""
        A, B = self.lora_A[m], self.lora_B[m]                          # (P, r, in), (P, d, r)
        delta = A.new_zeros(3, self.part_width, self.in_features)
        delta[self.part_index] = self.scaling * torch.bmm(B, A)
        return delta.reshape(self.out_features, self.in_features)

    member_module = LoraEnsembleLinear.member_module

    def extra_repr(self) -> str:
        return f"parts={self.parts}, num_members={self.num_members}, r={self.r}, scaling={self.scaling}"


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
        return self.run_member_major(x, self.forward_member_major)

    def forward_member_major(self, x: Tensor) -> Tensor:
        """x: (M*B, ..., in) member-major on dimension 0."""
        M = self.num_members
        h = x.reshape(M, -1, self.in_features) * self.r.to(x.dtype).unsqueeze(1)        # (M, N, in)
        y = F.linear(h, self.base_layer.weight)                                          # (M, N, out), shared W
        y = torch.addcmul(self.bias.to(y.dtype).unsqueeze(1), y, self.s.to(y.dtype).unsqueeze(1))
        return y.view(*x.shape[:-1], self.out_features)

    def member_module(self, m: int) -> nn.Linear:
        """A standalone nn.Linear equal to member m: weight W * (s_m r_m^T), bias b_m (in W's dtype)."""
        merged = copy.deepcopy(self.base_layer)
        w = merged.weight
        with torch.no_grad():
            w.copy_(w.float() * torch.outer(self.s[m].float(), self.r[m].float()))
            merged.bias = nn.Parameter(self.bias[m].detach().to(device=w.device, dtype=w.dtype).clone())
        return merged

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


FAST_WEIGHT_INITS = ("gaussian", "random_sign", "ones")


def _draw(shape: tuple[int, int], init: str, std: float, generator: torch.Generator | None) -> Tensor:
    if init == "ones":
        return torch.ones(shape)
    if init == "gaussian":
        return torch.empty(shape).normal_(1.0, std, generator=generator)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1      # random_sign
