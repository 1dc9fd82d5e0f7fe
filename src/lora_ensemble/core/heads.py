"""M independent classification heads stored as stacked parameters.

A head receives member-major rows (M*B, ..., in); member m's rows go through member m's parameters:

    StackedLinear:     y[m] = x[m] @ W[m]^T + b[m]          W: (M, out, in), b: (M, out)
    StackedLayerNorm:  y[m] = LN(x[m]) * g[m] + beta[m]     g, beta: (M, D)

`stack_head` turns any head built of nn.Linear, nn.LayerNorm and parameter-free modules (activations,
dropout, pooling) into its M-member version, e.g. RoBERTa's dense -> tanh -> out_proj head. Like the adapters,
stacked heads keep float32 parameters on a half-precision model (`layers.adapter_dtype`) and check the rows they
receive against their owner's row contract (`batch.MemberModule`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ensemble.core.batch import MemberModule
from lora_ensemble.core.layers import adapter_dtype


class StackedLinear(MemberModule):
    """M linear layers in one: weight (M, out, in), bias (M, out) or None."""

    def __init__(self, num_members: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.num_members, self.in_features, self.out_features = num_members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_members, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_members, out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_members: int, init: str, generator: torch.Generator) -> "StackedLinear":
        """M heads shaped like `linear`: 'copy' repeats its weights; 'random' draws each member as
        nn.Linear.reset_parameters does (U(-1/sqrt(in), 1/sqrt(in)) for weight and bias)."""
        w = linear.weight
        head = cls(num_members, linear.in_features, linear.out_features, linear.bias is not None,
                   device=w.device, dtype=adapter_dtype(w.dtype))
        with torch.no_grad():
            if init == "copy":
                head.weight.copy_(w.detach().expand_as(head.weight))
                if head.bias is not None:
                    head.bias.copy_(linear.bias.detach().expand_as(head.bias))
            else:
                bound = 1.0 / math.sqrt(linear.in_features)
                head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=generator))
                if head.bias is not None:
                    head.bias.copy_(torch.empty(head.bias.shape).uniform_(-bound, bound, generator=generator))
        return head

    def forward(self, x: Tensor) -> Tensor:
        self.check_rows(x)
        h = x.reshape(self.num_members, -1, x.shape[-1])                      # (M, N, in)
        w = self.weight.to(h.dtype).transpose(1, 2)                            # (M, in, out)
        if self.bias is None:
            y = torch.bmm(h, w)
        else:
            y = torch.baddbmm(self.bias.to(h.dtype).unsqueeze(1), h, w)       # (M, N, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def member_module(self, m: int) -> nn.Linear:
        """Member m's head as a plain nn.Linear."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight[m])
            if self.bias is not None:
                linear.bias.copy_(self.bias[m])
        return linear

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


class StackedLayerNorm(MemberModule):
    """M LayerNorms over the last dimension D in one: weight, bias (M, D)."""

    def __init__(self, layer_norm: nn.LayerNorm, num_members: int):
        super().__init__()
        if len(layer_norm.normalized_shape) != 1:
            raise ValueError(f"only LayerNorms over the last dimension can be stacked, got {layer_norm}")
        self.num_members, self.eps = num_members, layer_norm.eps
        self.dim = layer_norm.normalized_shape[0]
        self.weight = self.bias = None
        if layer_norm.weight is not None:
            w = layer_norm.weight.detach()
            self.weight = nn.Parameter(w.to(adapter_dtype(w.dtype)).expand(num_members, -1).contiguous())
        if getattr(layer_norm, "bias", None) is not None:
            b = layer_norm.bias.detach()
            self.bias = nn.Parameter(b.to(adapter_dtype(b.dtype)).expand(num_members, -1).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        self.check_rows(x)
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        y = y.reshape(self.num_members, -1, self.dim)                          # (M, N, D)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype).unsqueeze(1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).unsqueeze(1)
        return y.reshape(x.shape)

    def member_module(self, m: int) -> nn.LayerNorm:
        ref = self.weight if self.weight is not None else self.bias
        ln = nn.LayerNorm(self.dim, eps=self.eps, elementwise_affine=self.weight is not None,
                          bias=self.bias is not None, device=None if ref is None else ref.device,
                          dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if self.weight is not None:
                ln.weight.copy_(self.weight[m])
            if self.bias is not None:
                ln.bias.copy_(self.bias[m])
        return ln


def stack_head(head: nn.Module, num_members: int, init: str, generator: torch.Generator, name: str = "head") -> nn.Module:
    """The M-member version of `head`: every nn.Linear becomes a StackedLinear and every nn.LayerNorm a
    StackedLayerNorm; parameter-free modules are kept. Other modules with parameters are refused."""
    if isinstance(head, nn.Linear):
        return StackedLinear.from_linear(head, num_members, init, generator)
    if isinstance(head, nn.LayerNorm):
        return StackedLayerNorm(head, num_members)
    if any(True for _ in head.parameters(recurse=False)):
        raise ValueError(
            f"head {name!r} contains a {type(head).__name__} with parameters; per-member heads can be built from "
            "nn.Linear, nn.LayerNorm and parameter-free modules only. Name the head's final nn.Linear in "
            "`head=` instead, or pass head=None."
        )
    stacked = copy.copy(head)             # shallow: a new module object sharing the non-module state
    stacked._modules = dict(head._modules)
    for child_name, child in head.named_children():
        stacked._modules[child_name] = stack_head(child, num_members, init, generator, f"{name}.{child_name}")
    return stacked


def member_head(stacked: nn.Module, m: int, dtype: torch.dtype | None = None) -> nn.Module:
    """Inverse of `stack_head` for member m: a head of the original classes holding member m's weights, in
    `dtype` (the frozen model's, when the stacked head keeps float32 copies) or the stacked head's own."""
    if isinstance(stacked, MemberModule):
        plain_head = stacked.member_module(m)
        return plain_head if dtype is None else plain_head.to(dtype)
    plain = copy.copy(stacked)
    plain._modules = {n: member_head(c, m, dtype) for n, c in stacked.named_children()}
    return plain
