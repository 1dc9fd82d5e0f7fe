"""Member-major batches and the row contract that every member-aware module checks.

Member m owns rows m*B .. (m+1)*B-1 of every batched tensor (M*B rows in all).

    expand_batch(args, kwargs, M) -> (B, args', kwargs')      every tensor with leading dimension B repeated M times
    output_tensor(model_output)    -> the prediction tensor     (a tensor, `.logits`, or the first of a tuple)

The row contract. The owner of member-aware modules (`LoraEnsemble`, `BatchEnsemble`) knows the batch size B of
the call it is running; it opens its `RowContract` for that call (`contract.open(M * B)` ... `contract.close()`).
Every `MemberModule` inside then checks that its input has exactly M*B rows along its member axis (dimension 0,
or 1 for a layer inside a sequence-first `nn.Transformer*` block) and raises a ValueError naming the module
otherwise, so members can never be mixed silently. Outside an open contract (a layer called on its own, or the
recomputation of a gradient-checkpointed block during backward) only divisibility by M can be checked.

The shared trunk marks its repeat point explicitly: `contract.mark_repeat(repeated, source)` says that tensor
`repeated` (M*B rows) is `source` (B rows) repeated member-major, and adapted layers that receive exactly that
tensor run their frozen matmul once on `source` (`contract.repeat_source(x)`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn


def check_num_members(num_members: Any, meaning: str = "") -> int:
    """`num_members` if it is an integer >= 1, else a ValueError; `meaning` says what a member is for this
    method (e.g. "test-time passes"), shown in the message."""
    if not isinstance(num_members, int) or isinstance(num_members, bool) or num_members < 1:
        what = f"num_members ({meaning})" if meaning else "num_members"
        raise ValueError(f"{what} must be an integer >= 1, got {num_members!r}")
    return num_members


class RowContract:
    """The number of rows every member-aware module of one owner receives during the owner's forward.

    rows: M*B while a forward runs, None otherwise. One contract per owner; its modules hold a reference.
    """

    def __init__(self, num_members: int):
        self.num_members = num_members
        self.rows: int | None = None
        self._repeats: list[tuple[Tensor, Tensor, int | None, int | None]] = []

    def open(self, rows: int, owner: str = "LoraEnsemble") -> None:
        if self.rows is not None:
            raise RuntimeError(
                f"{owner}'s forward was entered again before the previous call returned (a re-entrant call, or the "
                "same model run from several threads, as nn.DataParallel does); run one forward at a time per "
                "ensemble, e.g. one process per device with DistributedDataParallel"
            )
        self.rows = rows

    def close(self) -> None:
        self.rows = None
        self._repeats.clear()

    def mark_repeat(self, repeated: Tensor, source: Tensor) -> None:
        """`repeated` is `source` repeated member-major (M*B vs B rows), as just made by `repeat_batch`."""
        if repeated.is_inference() or source.is_inference():
            return  # no version counters to prove that neither is changed in place later: never share
        self._repeats.append((repeated, source, repeated._version, source._version))

    def repeat_source(self, x: Tensor) -> Tensor | None:
        """The B-row tensor that `x` repeats, when `x` is a tensor marked by `mark_repeat` and neither it nor
        its source has been modified in place since; else None."""
        for repeated, source, version, source_version in self._repeats:
            if x is repeated:
                return source if x._version == version and source._version == source_version else None
        return None


class MemberModule(nn.Module, abc.ABC):
    """Base class of every module that holds per-member parameters stacked with leading dimension M and
    receives member-major rows: the adapted layers, the stacked heads, BatchEnsemble's layers.

    num_members: M. member_axis: the dimension that holds the M*B rows (0; 1 for sequence-first layouts).
    row_contract / member_name: set by the owner when it injects the module (None / '' for a module used alone).
    """

    num_members: int
    member_axis: int = 0
    folds_batch: bool = False   # inside window attention: K*M*B rows (see check_rows)
    row_contract: RowContract | None = None
    member_name: str = ""

    def check_rows(self, x: Tensor) -> int:
        """N = the rows per member of input x (M*N rows along `member_axis`); ValueError naming this module if
        x has another number of rows than the open row contract says (or, outside one, not a multiple of M).

        A module with `folds_batch` (inside Swin's window attention, which folds the windows of each sample
        into the batch sample by sample: (B, nW, ...) -> (B*nW, ...), keeping member-major order) accepts any
        multiple K*M*B of the contract's rows."""
        M, axis = self.num_members, self.member_axis
        if x.dim() <= axis:
            raise ValueError(f"{self._where()} received a tensor of shape {tuple(x.shape)}, which has no member "
                             f"axis (dimension {axis})")
        rows = x.shape[axis]
        contract = self.row_contract
        expected = contract.rows if contract is not None else None
        if expected is not None and rows != expected and not (self.folds_batch and rows % expected == 0):
            raise ValueError(
                f"{self._where()} received {rows} rows along dimension {axis} (input shape {tuple(x.shape)}), but this "
                f"forward gives every member-aware module {M} members x batch {expected // M} = {expected} rows. "
                "Its members would be mixed: the module sees a tensor whose batch is not on dimension "
                f"{axis} (e.g. a sequence-first layout), or the model reshapes the batch. Leave this module out "
                "of target_modules (or head=), or make the model keep the batch on dimension 0 (a model that "
                "folds other dimensions into the batch sample by sample, as Swin's windows do, can set "
                "`folds_batch = True` on the module)"
            )
        if rows % M:
            raise ValueError(
                f"{self._where()} received {rows} rows along dimension {axis}, not a multiple of num_members={M}; "
                "call the model through its ensemble, which repeats the batch member-major"
            )
        return rows // M

    @abc.abstractmethod
    def member_module(self, m: int) -> nn.Module:
        """Member m as a standalone module of the wrapped module's own class (an adapter merged into its
        weight, one member's head, one member's fast weights folded in), holding copies of its tensors.
        Every member-aware module implements it; `LoraEnsemble.member(m)` is built from it."""

    def run_member_major(self, x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:
        """`forward` on x with the member axis moved to dimension 0 (and the result's moved back), after
        `check_rows(x)`: the one place where the member axis of a sequence-first layout is handled."""
        self.check_rows(x)
        if self.member_axis == 0:
            return forward(x)
        return forward(x.movedim(self.member_axis, 0)).movedim(0, self.member_axis)

    def _where(self) -> str:
        return f"{type(self).__name__} {self.member_name!r}" if self.member_name else type(self).__name__


def run_members(model: nn.Module, args: tuple, kwargs: dict, num_members: int, contract: RowContract | None = None,
                owner: str = "LoraEnsemble", forward: Callable[[int, tuple, dict], Any] | None = None,
                return_output: bool = False) -> Tensor | tuple[Any, Tensor]:
    """Member outputs (M, B, ...) of `model` on one batch of B rows: the batch repeated member-major (M*B rows),
    one call of the model, its prediction tensor (`output_tensor`) viewed as (M, B, ...). With `contract`, it
    is open for M*B rows during the call. `forward(B, args, kwargs)` replaces "repeat, then call the model" and
    returns the model's output (the shared trunk repeats inside the model). With `return_output`, returns
    (the model's own output object, member outputs). The one place where an owner of members runs them."""
    M = num_members
    source, batch_size = batch_size_of(args, kwargs)
    if contract is not None:
        contract.open(M * batch_size, owner=owner)
    try:
        if forward is None:
            args, kwargs = repeat_batch(args, kwargs, batch_size, M, source=source)
            output = model(*args, **kwargs)
        else:
            output = forward(batch_size, args, kwargs)
    finally:
        if contract is not None:
            contract.close()
    rows = output_tensor(output)
    if rows.shape[0] != M * batch_size:
        raise ValueError(
            f"the model returned {rows.shape[0]} rows for {M} members x batch {batch_size}; {owner} needs a "
            "model whose output's leading dimension is the batch"
        )
    member_outputs = rows.view(M, batch_size, *rows.shape[1:])
    return (output, member_outputs) if return_output else member_outputs


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
                 source: str = "the first input", contract: RowContract | None = None) -> tuple[tuple, dict]:
    """`x.repeat(M, 1, ...)` for every tensor with leading dimension `batch_size`; with `strict`, any
    other leading dimension but 1 is a ValueError naming `source` (where the batch size came from), else
    such tensors pass unchanged. With `contract`, every repeated tensor is marked as a repeat of its source
    (`RowContract.mark_repeat`)."""

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
            if contract is not None:
                contract.mark_repeat(repeated, x)
            return repeated
        if isinstance(x, Mapping):
            return type(x)({k: repeat(v, f"{name}[{k!r}]") for k, v in x.items()}) if isinstance(x, dict) else x
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(repeat(v, f"{name}[{i}]") for i, v in enumerate(x))
        return x

    args = tuple(repeat(a, f"argument {i}") for i, a in enumerate(args))
    kwargs = {k: repeat(v, repr(k)) for k, v in kwargs.items()}
    return args, kwargs


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
