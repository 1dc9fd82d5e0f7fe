"""`TrunkCache`: the shared trunk's output kept per training sample, so later epochs skip the trunk.

A sample's trunk output then depends on that sample alone (when the trunk has no active dropout), so during
training `TrunkCache` can keep it per training sample:

    first time a sample is seen: inputs -> embeddings -> trunk blocks -> h (B, ...) -> stored under its id
                                                                        -> adapted blocks -> (M, B, ...)
    every later time:            inputs -> embeddings -> trunk blocks skipped; h = stored rows
                                                                        -> adapted blocks -> (M, B, ...)

h is the hidden-state argument of the first adapted block. A batch is replayed only when every one of its
samples was stored with the same input shapes (for text: the same padded length); otherwise the trunk runs
and the batch is stored again. Outputs and gradients equal the uncached path (tested), because nothing
before the first adapted block trains. Memory: N samples x prod(h.shape[1:]) x itemsize (e.g. 400 articles
x 64 tokens x 384 x 4 B = 39 MB), held on `device` (CPU by default).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.core.batch import batch_size_of
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.targets import block_names

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


class TrunkCache:
    """Per-sample trunk outputs of a `LoraEnsemble` built with `share_trunk=True`.

    cache = TrunkCache(ensemble)
    member_logits = cache(sample_ids, **inputs)     # (M, B, C), as ensemble(**inputs)

    sample_ids: (B,) integers naming each sample of the batch across epochs (its index in the training
    set). The cache is for training on a fixed training set: evaluation calls the ensemble directly.
    """

    def __init__(self, ensemble: nn.Module, device: str | torch.device | None = "cpu"):
        if not isinstance(ensemble, LoraEnsemble):
            raise TypeError(f"TrunkCache caches the trunk of a LoraEnsemble, got {type(ensemble).__name__}")
        if ensemble.trunk_end is None:
            raise ValueError("TrunkCache needs a frozen trunk: build the ensemble with share_trunk=True and `layers` "
                             "naming the last blocks only, e.g. LoraEnsembleConfig(layers=[-2, -1], share_trunk=True)")
        model = ensemble.model
        self.first_block = ensemble.trunk_end[0]
        names = block_names(model)
        self.skipped_blocks: list[str] = []  # the outermost blocks before the first adapted one
        for name in names[: names.index(self.first_block)]:
            if self.first_block.startswith(name + ".") or any(name.startswith(s + ".") for s in self.skipped_blocks):
                continue
            self.skipped_blocks.append(name)
        if not self.skipped_blocks:
            raise ValueError(f"no frozen block comes before the first adapted block {self.first_block!r}: there is "
                             "no trunk to cache; adapt only the last blocks with `layers`")
        trainable = [f"{b}.{n}" for b in self.skipped_blocks
                     for n, p in model.get_submodule(b).named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the trunk must be frozen to be cached, but {trainable[:3]} train")
        self.ensemble = ensemble
        self.device = None if device is None else torch.device(device)
        self._rows: dict[int, Tensor] = {}                     # sample id -> h[i]
        self._signature: dict[int, Signature] = {}             # sample id -> input shapes it was stored with
        self._skip_outputs: dict[Signature, dict[str, tuple[tuple[int, ...], torch.dtype, int | None]]] = {}
        self._dropout_checked = False
        self.computed_batches = 0
        self.replayed_batches = 0

    # ---- public -------------------------------------------------------------------------------------
    def __call__(self, sample_ids: Tensor | Sequence[int], *args: Any, **kwargs: Any) -> Tensor:
        """Member outputs (M, B, ...) for one batch, equal to `ensemble(*args, **kwargs)`."""
        ids = self._check_ids(sample_ids, args, kwargs)
        signature = input_signature(args, kwargs)
        if signature in self._skip_outputs and all(self._signature.get(i) == signature for i in ids):
            self.replayed_batches += 1
            return self._replay(ids, signature, args, kwargs)
        self.computed_batches += 1
        return self._compute(ids, signature, args, kwargs)

    def __len__(self) -> int:
        """Number of samples stored."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._rows.values())

    def clear(self) -> None:
        self._rows.clear()
        self._signature.clear()
        self._skip_outputs.clear()

    # ---- the two paths ------------------------------------------------------------------------------
    def _compute(self, ids: list[int], signature: Signature, args: tuple, kwargs: dict) -> Tensor:
        model, hooks = self.ensemble.model, []
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype, int | None]] = {}
        ran_dropout: list[str] = []
        reached_first = []

        def store(module: nn.Module, a: tuple, kw: dict) -> None:
            reached_first.append(True)
            h = _hidden_state(a, kw, self.first_block)
            if h.shape[0] != len(ids):
                raise ValueError(f"{self.first_block} received {h.shape[0]} rows for a batch of {len(ids)}")
            if h.requires_grad:
                raise ValueError(f"the input of {self.first_block} requires grad: something before the first adapted "
                                 "block trains, so its output cannot be cached")
            rows = h.detach().to(self.device or h.device)
            for i, row in zip(ids, rows.unbind(0)):  # a copy per row: a replaced row frees its memory
                self._rows[i], self._signature[i] = row.clone(), signature

        def record(name: str) -> Callable:
            def hook(module: nn.Module, a: tuple, out: Any) -> None:
                shapes[name] = _output_template(out, name)
            return hook

        hooks.append(model.get_submodule(self.first_block).register_forward_pre_hook(store, with_kwargs=True,
                                                                                     prepend=True))
        hooks += [model.get_submodule(n).register_forward_hook(record(n)) for n in self.skipped_blocks]
        if not self._dropout_checked:
            for name, m in model.named_modules():
                if isinstance(m, nn.Dropout) and m.p > 0:
                    hooks.append(m.register_forward_pre_hook(
                        lambda mod, a, name=name: None if reached_first or not mod.training else ran_dropout.append(name)))
        try:
            output = self.ensemble(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        if not reached_first:
            raise ValueError(f"the model never called its block {self.first_block}; cannot cache its input")
        self._skip_outputs[signature] = shapes
        if not self._dropout_checked:
            self._dropout_checked = True
            if ran_dropout:
                warnings.warn(f"the cached trunk has active dropout ({', '.join(ran_dropout[:3])}): every later epoch "
                              "reuses the first epoch's draw. Set the trunk's dropout to 0 for training equal to "
                              "the uncached path.", stacklevel=3)
        return output

    def _replay(self, ids: list[int], signature: Signature, args: tuple, kwargs: dict) -> Tensor:
        model, hooks, shapes = self.ensemble.model, [], self._skip_outputs[signature]

        def load(module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
            h = _hidden_state(a, kw, self.first_block)
            cached = torch.stack([self._rows[i] for i in ids]).to(h.device)
            return _replace_hidden_state(a, kw, cached)

        hooks.append(model.get_submodule(self.first_block).register_forward_pre_hook(load, with_kwargs=True,
                                                                                     prepend=True))
        saved = {}
        try:
            for name in self.skipped_blocks:
                block = model.get_submodule(name)
                saved[name] = block.__dict__.get("forward")
                block.forward = _skipped_forward(*shapes[name])
            return self.ensemble(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            for name, forward in saved.items():
                block = model.get_submodule(name)
                del block.forward
                if forward is not None:
                    block.forward = forward

    def _check_ids(self, sample_ids: Tensor | Sequence[int], args: tuple, kwargs: dict) -> list[int]:
        ids = torch.as_tensor(sample_ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"sample_ids must be a 1-D integer tensor (B,), got {ids.dtype} {tuple(ids.shape)}")
        batch_size = batch_size_of(args, kwargs)[1]
        if ids.shape[0] != batch_size:
            raise ValueError(f"{ids.shape[0]} sample_ids for a batch of {batch_size}")
        return ids.tolist()


# ---- helpers ---------------------------------------------------------------------------------------
def input_signature(args: tuple, kwargs: dict) -> Signature:
    """(path, shape without the batch dimension, dtype) of every tensor input: samples stored under one
    signature are replayed only in batches of the same signature."""
    found: list[tuple[str, tuple[int, ...], str]] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, Tensor):
            if x.dim() > 0:
                found.append((path, tuple(x.shape[1:]), str(x.dtype)))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}.{i}")

    walk(args, "args")
    walk(kwargs, "kwargs")
    return tuple(found)


def _hidden_state(args: tuple, kwargs: dict, block: str) -> Tensor:
    """A block's hidden-state input: its first positional argument, or the keyword `hidden_states`."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise ValueError(f"cannot find the hidden-state input of {block}: it takes no tensor as its first "
                         "argument or as `hidden_states`")
    return h


def _replace_hidden_state(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _output_template(out: Any, name: str) -> tuple[tuple[int, ...], torch.dtype, int | None]:
    """(shape without batch, dtype, tuple length or None) of a skipped block's output; the block must return
    a tensor, or a tuple of a tensor and Nones (older Hugging Face blocks)."""
    if isinstance(out, Tensor):
        return tuple(out.shape[1:]), out.dtype, None
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor) and all(o is None for o in out[1:]):
        return tuple(out[0].shape[1:]), out[0].dtype, len(out)
    raise ValueError(f"cannot skip block {name}: it returned {type(out).__name__}, not a tensor (or a tuple of a "
                     "tensor and Nones)")


def _skipped_forward(shape: tuple[int, ...], dtype: torch.dtype, tuple_len: int | None) -> Callable:
    """A stand-in forward for a skipped block: zeros of the block's output shape (the first adapted block's
    input is replaced by the stored rows, so whatever runs between here and there does not matter)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = _hidden_state(args, kwargs, "a skipped block")
        out = torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)
        return out if tuple_len is None else (out,) + (None,) * (tuple_len - 1)

    return forward
