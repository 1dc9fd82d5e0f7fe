"""The baseline methods, behind one contract, so training, evaluation and the CLI never ask which one it is.

    from lora_ensemble.methods import build_method
    method = build_method("mc_dropout", model, num_members=4, dropout=0.1)
    member_logits = method(**batch)          # (M, B, C); in training a method may return fewer members

The contract. A method is an nn.Module with attribute `num_members` whose forward takes the wrapped model's own
inputs for a batch of B and returns member outputs (M, B, ...) (M = 1 for single models; in training mode a
method may return fewer, e.g. MC dropout's one pass (1, B, C); the loss is the mean over the members returned).
Its trainable parameters are exactly those with requires_grad=True. A method that cannot run on a model raises
ValueError, saying why, when it is built.

Optional hooks (any method may define them; the trainer calls those present):
    lr_lambda(total_steps) -> Callable[[int], float] | None
        the learning-rate multiplier of optimizer step t (0-based, as torch's LambdaLR counts), replacing the
        default warm-up + cosine; None keeps the default.                                 (snapshot)
    on_train_batch_end(step, total_steps) -> None
        called after the optimizer (and scheduler) step of 0-based step `step` of `total_steps`. (snapshot)

    name             what                                                     options (besides num_members)
    single           full fine-tune, M = 1                                    -
    single_lora      LoraEnsemble with one member                             LoraEnsembleConfig fields, config=
    lora_ensemble    LoraEnsemble (the paper)                                 LoraEnsembleConfig fields, config=
    explicit         M full copies, re-drawn heads, vmap or loop              head, head_init, seed, vectorize
    mc_dropout       dropout on at test time, M passes as one batch           dropout, attention_dropout, seed,
                                                                              lora (+ LoraEnsembleConfig fields)
    snapshot         cyclic cosine lr, M snapshots (hooks above)              cycles (>= M; the last M are members), vectorize
    batch_ensemble   rank-1 fast weights on the LoRA targets, frozen backbone target_modules, layers, head,
                                                                              head_init, init, init_std, seed

Adding a method:
    1. write `methods/<name>.py`: an nn.Module following the contract above whose constructor (or a
       builder function) is `(model, num_members=4, options...)` and raises ValueError for a model it
       cannot run on; name the options as keywords, so that build_method lists them on a typo;
    2. add one line `"<name>": <name>.<Class>,` to METHODS below;
    3. add its promises to tests/test_methods.py (output shape, which parameters train).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lora_ensemble.methods import batch_ensemble, explicit, lora, mc_dropout, single, snapshot

METHODS: dict[str, Callable[..., nn.Module]] = {
    "single": single.build,
    "single_lora": lora.build_single_lora,
    "lora_ensemble": lora.build_lora_ensemble,
    "explicit": explicit.ExplicitEnsemble,
    "mc_dropout": mc_dropout.MCDropout,
    "snapshot": snapshot.SnapshotEnsemble,
    "batch_ensemble": batch_ensemble.BatchEnsemble,
}


def build_method(name: str, model: nn.Module, num_members: int = 4, **options: Any) -> nn.Module:
    """The method `name` around `model` (which it may modify in place). Unknown names or options: ValueError."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    builder = METHODS[name]
    accepted = _named_options(builder)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {name!r}; it accepts {sorted(accepted)}")
    return builder(model, num_members, **options)


def accepts_option(name: str, option: str) -> bool:
    """Whether method `name` takes keyword `option` (e.g. 'seed'); builders taking **options accept all."""
    accepted = _named_options(METHODS[name]) if name in METHODS else set()
    return accepted is None or option in accepted


def _named_options(builder: Callable[..., nn.Module]) -> set[str] | None:
    """The keyword options a builder (class or function) names; None when it takes **options and checks
    them itself."""
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"model", "num_members"}


__all__ = ["METHODS", "accepts_option", "build_method"]
