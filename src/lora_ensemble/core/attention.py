"""LoRA-Ensemble for `nn.MultiheadAttention` (torchvision ViT, nn.TransformerEncoderLayer).

nn.MultiheadAttention keeps q/k/v in one fused `in_proj_weight` (3E, E) and calls its `out_proj` through
`F.multi_head_attention_forward`, so adapters cannot be slipped in as submodules. This module re-states
the self-attention forward with the in-projection and out-projection as (adaptable) modules:

    q, k, v = split(in_proj(x))                      x: (N, T, E), each (N, H, T, E/H)
    out     = out_proj(softmax(q k^T / sqrt(E/H) + mask) v)

and `member_module(m)` gives back a plain nn.MultiheadAttention with member m merged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ensemble.core.batch import MemberModule
from lora_ensemble.core.layers import InProjection, LoraEnsembleFusedLinear, LoraEnsembleLinear


def check_supported(mha: nn.MultiheadAttention, name: str) -> None:
    """Refuse the nn.MultiheadAttention variants this module does not re-state, saying what to do."""
    problems = []
    if not mha._qkv_same_embed_dim:
        problems.append("kdim/vdim different from embed_dim")
    if mha.bias_k is not None or mha.bias_v is not None:
        problems.append("add_bias_kv=True")
    if mha.add_zero_attn:
        problems.append("add_zero_attn=True")
    if problems:
        raise ValueError(
            f"nn.MultiheadAttention {name!r} uses {', '.join(problems)}, which LoRA-Ensemble does not adapt; "
            "leave it out of target_modules (e.g. a regex that does not match it)"
        )


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention masks (bool: True = masked out, or float: added) as a float mask to add."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class LoraEnsembleMultiheadAttention(MemberModule):
    """Self-attention of a frozen nn.MultiheadAttention with ensemble adapters on the chosen q/k/v
    slices of its in-projection and, optionally, on its out-projection."""

    def __init__(self, mha: nn.MultiheadAttention, parts: list[str], adapt_out: bool, num_members: int, r: int,
                 scaling: float, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first, self.attn_dropout = mha.batch_first, mha.dropout
        self.num_members = num_members
        self.member_axis = 0 if mha.batch_first else 1       # its projections below get (N, T, E): axis 0
        in_proj: nn.Module = InProjection(mha.in_proj_weight, mha.in_proj_bias)
        if parts:
            in_proj = LoraEnsembleFusedLinear(in_proj, parts, num_members, r, scaling, dropout)
        self.in_proj = in_proj
        self.out_proj = LoraEnsembleLinear(mha.out_proj, num_members, r, scaling, dropout) if adapt_out else mha.out_proj

    _qkv_same_embed_dim = True  # read by torch's Transformer fast-path checks; check_supported ensures it

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The frozen in-projection bias, under nn.MultiheadAttention's name (torch's fast-path checks read it)."""
        base = self.in_proj.base_layer if isinstance(self.in_proj, LoraEnsembleFusedLinear) else self.in_proj
        return base.bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not (query is key and key is value):
            raise ValueError(
                "LoRA-Ensemble adapts nn.MultiheadAttention for self-attention only (query is key is value); "
                "leave cross-attention modules out of target_modules"
            )
        self.check_rows(query)
        x = query if self.batch_first else query.transpose(0, 1)             # (N, T, E)
        N, T, E = x.shape
        H = self.num_heads
        q, k, v = self.in_proj(x).view(N, T, 3, H, E // H).permute(2, 0, 3, 1, 4)  # each (N, H, T, E/H)

        mask = _additive_mask(attn_mask, q.dtype)                            # (T, T) or (N*H, T, T)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(N, H, T, T)
        pad = _additive_mask(key_padding_mask, q.dtype)                      # (N, T)
        if pad is not None:
            pad = pad.view(N, 1, 1, T)
            mask = pad if mask is None else mask + pad
        if is_causal and mask is None:
            mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        p = self.attn_dropout if self.training else 0.0

        if need_weights:
            scores = q @ k.transpose(-2, -1) / (E // H) ** 0.5                # (N, H, T, T)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            attn = F.dropout(weights, p, training=self.training) @ v
        else:
            weights = None
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(attn.transpose(1, 2).reshape(N, T, E))          # (N, T, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def member_module(self, m: int) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with member m's adapters merged into its weights."""
        in_proj = self.in_proj.member_module(m) if isinstance(self.in_proj, LoraEnsembleFusedLinear) else self.in_proj
        out_proj = self.out_proj.member_module(m) if isinstance(self.out_proj, LoraEnsembleLinear) else self.out_proj
        w = in_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.attn_dropout,
                                    bias=in_proj.bias is not None, batch_first=self.batch_first,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(in_proj.weight)
            if in_proj.bias is not None:
                mha.in_proj_bias.copy_(in_proj.bias)
            mha.out_proj.weight.copy_(out_proj.weight)
            if out_proj.bias is not None:
                mha.out_proj.bias.copy_(out_proj.bias)
        return mha


def _fast_path_off(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: torch's Transformer layers skip their fused fast path (which
    reads the frozen weights directly and would bypass the adapters) when a module has hooks."""
    return None


def disable_transformer_fast_paths(model: nn.Module, member_module_names: list[str]) -> None:
    """Make the torch nn.TransformerEncoder / nn.Transformer*Layer blocks that hold member modules take their
    ordinary path, which calls the (adapted) submodules: no nested-tensor conversion, no fused kernel."""
    for name, module in model.named_modules():
        holds = any(n.startswith(name + ".") for n in member_module_names) if name else bool(member_module_names)
        if not holds:
            continue
        if isinstance(module, nn.TransformerEncoder):
            if not hasattr(module, "_nested_tensor_before_adapters"):
                module._nested_tensor_before_adapters = module.use_nested_tensor
            module.use_nested_tensor = False
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if _fast_path_off not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_fast_path_off)


def restore_transformer_fast_paths(model: nn.Module) -> None:
    """Undo `disable_transformer_fast_paths` on every block of `model` (once its adapters are removed)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and hasattr(module, "_nested_tensor_before_adapters"):
            module.use_nested_tensor = module._nested_tensor_before_adapters
            del module._nested_tensor_before_adapters
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _fast_path_off:
                del module._forward_pre_hooks[key]
