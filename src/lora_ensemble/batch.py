"""Member-major batches: member m owns rows m*B .. (m+1)*B-1 of every batched tensor (M*B rows in all).

    expand_batch(args, kwargs, M) -> (B, args', kwargs')      every tensor with leading dimension B repeated M times
    output_tensor(model_output)    -> the prediction tensor     (a tensor, `.logits`, or the first of a tuple)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

REPEAT_OF = "_lora_ensemble_repeat_of"  # attribute of a repeated tensor: (source, source version, own version)


def expand_batch(args: tuple, kwargs: dict, num_members: int) -> tuple[int, tuple, dict]:
    """Repeat every tensor whose leading dimension is the batch size B member-major to M*B rows.

    B is the leading dimension of the first tensor argument (positional first, then keyword). Tensors
    with leading dimension 1 (broadcast over the batch) and 0-d tensors pass unchanged; any other
    leading dimension is an error. Lists, tuples and dicts are searched recursively.
    """
    source, batch_size = batch_size_of(args, kwargs)
    args, kwargs = repeat_batch(args, kwargs, batch_size, num_members, source=source)
    return batch_size, args, kwargs


def batch_size_of(args: tuple, kwargs: dict) -> tuple[str, int]:
    """(name, leading dimension) of the first tensor argument with at least one dimension."""
    first = _first_tensor(args, "args") or _first_tensor(kwargs, "kwargs")
    if first is None:
        raise ValueError("LoraEnsemble needs at least one tensor input with a batch dimension")
    return first


def repeat_batch(args: tuple, kwargs: dict, batch_size: int, num_members: int, strict: bool = True,
                 source: str = "the first input") -> tuple[tuple, dict]:
    """`x.repeat(M, 1, ...)` for every tensor with leading dimension `batch_size`; with `strict`, any
    other leading dimension but 1 is a ValueError naming `source` (where the batch size came from), else
    such tensors pass unchanged."""

    def repeat(x: Any, name: str) -> Any:
        if isinstance(x, Tensor):
            if x.dim() == 0 or (x.shape[0] == 1 and batch_size != 1):
                return x
            if x.shape[0] != batch_size:
                if not strict:
                    return x
                raise ValueError(
                    f"input {name} has leading dimension {x.shape[0]}, but the batch size (from {source}) is "
                    f"{batch_size}; every batched input must have the same batch size"
                )
            repeated = x.repeat(num_members, *([1] * (x.dim() - 1)))
            if not x.is_inference():  # inference tensors keep no version counter to check against
                setattr(repeated, REPEAT_OF, (x, x._version, repeated._version))
            return repeated
        if isinstance(x, Mapping):
            return type(x)({k: repeat(v, f"{name}[{k!r}]") for k, v in x.items()}) if isinstance(x, dict) else x
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(repeat(v, f"{name}[{i}]") for i, v in enumerate(x))
        return x

    args = tuple(repeat(a, f"argument {i}") for i, a in enumerate(args))
    kwargs = {k: repeat(v, repr(k)) for k, v in kwargs.items()}
    return args, kwargs


def repeat_source(x: Tensor) -> Tensor | None:
    """The B-row tensor that `x` (M*B rows) repeats member-major, when `repeat_batch` made `x` and neither
    tensor has been modified in place since; else None. Adapted layers use it to run their frozen part once
    on B rows where every member's input is the same (the first adapted block of a shared trunk)."""
    mark = getattr(x, REPEAT_OF, None)
    if mark is None:
        return None
    source, source_version, version = mark
    return source if source._version == source_version and x._version == version else None


def _first_tensor(x: Any, name: str) -> tuple[str, int] | None:
    if isinstance(x, Tensor):
        return (name, x.shape[0]) if x.dim() > 0 else None
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    for k, v in items:
        found = _first_tensor(v, repr(k) if isinstance(k, str) else f"{name}[{k}]")
        if found:
            return found
    return None


def output_tensor(output: Any) -> Tensor:
    """The prediction tensor of a model's output: a tensor, `.logits` of a Hugging Face output, or the
    first tensor of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the prediction tensor in a model output of type {type(output).__name__}")
