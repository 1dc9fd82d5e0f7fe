"""The shared trunk: with adapters in the last blocks only, the frozen blocks before them run once.

With `LoraEnsembleConfig(layers=[-k, ..., -1], share_trunk=True)` everything before the first adapted block
(the *trunk*) is frozen and identical for every member, so it runs on the B original rows; the hidden states
are repeated member-major (M*B rows) only from the first adapted block on (`shared_trunk_forward`).

During training `TrunkCache` (trunk_cache.py) keeps the trunk's output per training sample.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_ensemble.core.batch import RowContract, repeat_batch


def shared_trunk_forward(model: nn.Module, trunk_end: list[str], num_members: int, batch_size: int, args: tuple,
                         kwargs: dict, contract: RowContract) -> Any:
    """The model's output (its prediction tensor has M*B rows) for inputs of B rows, repeated member-major by
    forward pre-hooks on every block of `trunk_end` (the first adapted block and all blocks after it); tensors that already have
    M*B rows, or any leading dimension but B, pass those hooks unchanged. Every tensor a hook repeats is marked
    on `contract` as a repeat of its B rows (the explicit repeat point the adapted layers share work at)."""
    reached = []

    def repeat_at_block(module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
        return repeat_batch(a, kw, batch_size, num_members, strict=False, contract=contract)

    first = model.get_submodule(trunk_end[0])
    handles = [first.register_forward_pre_hook(lambda *a: reached.append(True), prepend=True)]
    handles += [model.get_submodule(n).register_forward_pre_hook(repeat_at_block, with_kwargs=True)
                for n in trunk_end]
    not_called = ValueError(f"share_trunk: the model never called its block {trunk_end[0]!r} as a module, so the "
                            "batch could not be repeated there; use share_trunk=False")
    try:
        output = model(*args, **kwargs)
    except ValueError as e:  # e.g. an adapted layer that received B rows: say why
        if reached:
            raise
        raise not_called from e
    finally:
        for h in handles:
            h.remove()
    if not reached:
        raise not_called
    return output
