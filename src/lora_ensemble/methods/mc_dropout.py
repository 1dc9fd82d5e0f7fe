"""`mc_dropout`: one network whose dropout stays on at test time; M stochastic passes are the members.

    train:  one ordinary pass with dropout                                      -> (1, B, C)
    eval:   x repeated member-major to M*B rows, one forward with dropout on     -> (M, B, C)

Every row draws its own dropout masks, so the M copies of a sample are M independent passes, run as one
batch. At eval the passes draw from a forked RNG seeded with `seed` on every call: the same inputs give the
same member logits every time, and the global RNG is left untouched (seed=None: draw from the global RNG).

Dropout sites (both stay active at eval, nothing else does: LayerNorm/BatchNorm, DropPath keep eval behaviour):
  * standard dropout: every `nn.Dropout`-family module that is not an attention dropout; rate `dropout`.
  * attention dropout: modules whose class name contains "Attention" (and nn.MultiheadAttention) with an
    attribute among ATTENTION_DROPOUT_ATTRS, a float or an nn.Dropout; rate `attention_dropout`. transformers
    5.x and timm apply it inside the attention kernel as `dropout=self.dropout.p if self.training else 0.0`
    (BERT; ViT/Llama read a float `attention_dropout`), so the attention module itself is put in training
    mode, and the rate is written to the attribute and to the HF config (`attention_probs_dropout_prob`,
    `attention_dropout`, `attn_pdrop`).
A rate of None keeps the model's own rates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from lora_ensemble.core.batch import check_num_members, run_members
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.methods._stacked import forked_rng, model_devices, single_output
from lora_ensemble.methods.lora import CONFIG_FIELDS, _config

ATTENTION_DROPOUT_ATTRS = ("dropout", "attn_drop", "attn_dropout", "attention_dropout", "attn_drop_p", "dropout_p")
HF_ATTENTION_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
HF_HIDDEN_FIELDS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout")


class MCDropout(nn.Module):
    """One fine-tuned network (full fine-tune, or LoRA with lora=True) with M dropout passes at eval."""

    def __init__(self, model: nn.Module, num_members: int = 4, dropout: float | None = None,
                 attention_dropout: float | None = None, seed: int | None = 0, lora: bool = False, **lora_options: Any):
        super().__init__()
        check_num_members(num_members, "test-time passes")
        for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if rate is not None and not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
                raise ValueError(f"{name} must be a rate in [0, 1) or None (keep the model's), got {rate!r}")
        unknown = sorted(set(lora_options) - set(CONFIG_FIELDS))
        if unknown or (lora_options and not lora):
            raise ValueError(
                f"unknown option(s) {unknown or sorted(lora_options)} for method 'mc_dropout'; it accepts "
                f"['attention_dropout', 'dropout', 'lora', 'seed'] and, with lora=True, the LoraEnsembleConfig "
                f"fields {CONFIG_FIELDS}"
            )
        self.num_members, self.seed = num_members, seed
        attention, standard = dropout_sites(model)
        set_rates(model, attention, standard, dropout, attention_dropout)
        if not attention and not standard:
            raise ValueError(
                f"mc_dropout cannot run on {type(model).__name__}: it has no nn.Dropout module and no attention "
                f"module with a dropout attribute ({list(ATTENTION_DROPOUT_ATTRS)}); use another method"
            )
        if not any(rate > 0 for _, rate in attention + standard):
            raise ValueError(
                f"mc_dropout needs dropout, but the {len(standard)} nn.Dropout module(s) and {len(attention)} "
                f"attention dropout(s) of {type(model).__name__} all have rate 0; pass dropout=0.1 and/or "
                "attention_dropout=0.1"
            )
        if lora:
            self.net: nn.Module = LoraEnsemble(model, _config("mc_dropout", 1, None, lora_options))
        else:
            self.net = model.requires_grad_(True)
        # the modules switched to training mode at eval, found again after LoRA replaced some of them
        attention, standard = dropout_sites(self.model)
        self._sites = list({id(m): m for modules, _ in attention + standard for m in modules}.values())

    @property
    def model(self) -> nn.Module:
        return self.net.model if isinstance(self.net, LoraEnsemble) else self.net

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.training:
            return single_output(self.model, args, kwargs)
        with forked_rng(self.seed, model_devices(self.model)), self.dropout_on():
            return run_members(self.model, args, kwargs, self.num_members, owner="MCDropout")

    @contextlib.contextmanager
    def dropout_on(self) -> Iterator[None]:
        """Dropout sites in training mode (only their own flag), restored afterwards."""
        before = [site.training for site in self._sites]
        try:
            for site in self._sites:
                site.training = True
            yield
        finally:
            for site, mode in zip(self._sites, before):
                site.training = mode


def dropout_sites(model: nn.Module) -> tuple[list[tuple[list[nn.Module], float]], list[tuple[list[nn.Module], float]]]:
    """(attention sites, standard sites), each as ([modules to switch to training mode], current rate).

    An attention site is an attention module with its attention-dropout attribute: the module itself (its
    kernel reads the rate when `self.training`), plus the nn.Dropout when the attribute is one (called on the
    attention weights in eager code paths). Every other nn.Dropout is a standard site."""
    attention, attention_dropouts = [], set()
    for module in model.modules():
        if not _is_attention(module):
            continue
        for attr in ATTENTION_DROPOUT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, nn.modules.dropout._DropoutNd):
                attention.append(([module, value], float(value.p)))
                attention_dropouts.add(id(value))
            elif isinstance(value, float) and not isinstance(value, bool):
                attention.append(([module], value))
    standard = [([m], float(m.p)) for m in model.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and id(m) not in attention_dropouts]
    return attention, standard


def set_rates(model: nn.Module, attention: list, standard: list, dropout: float | None,
              attention_dropout: float | None) -> None:
    """Write the rates into the sites (in place, and into `attention`/`standard`) and the HF config."""
    config = getattr(model, "config", None)
    if attention_dropout is not None:
        for i, (modules, _) in enumerate(attention):
            for attr in ATTENTION_DROPOUT_ATTRS:
                value = getattr(modules[0], attr, None)
                if isinstance(value, nn.modules.dropout._DropoutNd):
                    value.p = float(attention_dropout)
                elif isinstance(value, float) and not isinstance(value, bool):
                    setattr(modules[0], attr, float(attention_dropout))
            attention[i] = (modules, float(attention_dropout))
        for field in HF_ATTENTION_FIELDS:
            if isinstance(getattr(config, field, None), float):
                setattr(config, field, float(attention_dropout))
    if dropout is not None:
        for i, (modules, _) in enumerate(standard):
            modules[0].p = float(dropout)
            standard[i] = (modules, float(dropout))
        for field in HF_HIDDEN_FIELDS:
            if isinstance(getattr(config, field, None), float):
                setattr(config, field, float(dropout))


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()
