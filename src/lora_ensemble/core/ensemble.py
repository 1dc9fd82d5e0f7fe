"""`LoraEnsemble`: M members on one frozen backbone, run as one batch.

    config -> adapters injected into the model (in place, nothing copied)
           -> batch repeated member-major (M*B rows)  -> model -> member outputs (M, B, ...)

Member m owns rows m*B .. (m+1)*B-1 of every tensor argument whose leading dimension is the batch
size B; each adapted layer runs the shared frozen weight once over all M*B rows and adds member m's
low-rank delta to member m's rows (see `layers.py`); per-member heads do the same (see `heads.py`).
During a forward the ensemble's row contract says how many rows that is (M*B), and every member-aware
module checks that it receives exactly that many (see `batch.py`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from lora_ensemble.core.attention import (
    LoraEnsembleMultiheadAttention,
    check_supported,
    disable_transformer_fast_paths,
    restore_transformer_fast_paths,
)
from lora_ensemble.core.batch import MemberModule, RowContract, output_tensor, run_members
from lora_ensemble.core.config import CONFIG_NAME, LoraEnsembleConfig
from lora_ensemble.core.heads import member_head, stack_head
from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear, init_lora_A
from lora_ensemble.core.targets import block_names, find_heads, find_targets
from lora_ensemble.core.trunk import shared_trunk_forward
from lora_ensemble.io import atomic_write_bytes, check_fingerprint, fingerprint, read_weights, resolve_checkpoint
from lora_ensemble.losses import member_cross_entropy

WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class LoraEnsemble(nn.Module):
    """An implicit deep ensemble of `config.num_members` LoRA members on one frozen `model`.

    `model` is modified in place (its targeted projections are wrapped, its head replaced by stacked
    per-member heads) and frozen; it is not copied. `ens(*args, **kwargs)` takes the model's own inputs
    for a batch of B samples and returns the member outputs, shape (M, B, ...) (logits for classifiers,
    (M, B, T, V) for causal LMs).
    """

    def __init__(self, model: nn.Module, config: LoraEnsembleConfig | None = None, **config_fields: Any):
        super().__init__()
        unknown = sorted(set(config_fields) - set(LoraEnsembleConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown LoraEnsembleConfig field(s) {unknown}; known fields: "
                             f"{sorted(LoraEnsembleConfig.__dataclass_fields__)}")
        if config is None:
            config = LoraEnsembleConfig(**config_fields)
        elif config_fields:
            config = config.replace(**config_fields)
        if not isinstance(model, nn.Module):
            raise TypeError(f"LoraEnsemble wraps an nn.Module, got {type(model).__name__}")
        if any(isinstance(m, MemberModule) for m in model.modules()):
            raise ValueError("this model already carries LoRA-Ensemble adapters; wrap a fresh model")
        self.ensemble_config = config
        self.base_fingerprint = fingerprint(model)
        heads = find_heads(model, config)
        targets = find_targets(model, config, heads)
        for name in heads:  # dry run: refuse an unstackable head before the model is touched
            stack_head(model.get_submodule(name), 1, "copy", torch.Generator(), name)
        for t in targets:
            if t.kind == "mha":
                check_supported(t.module, t.name)
        # what unload() gives back: the modules replaced here and the parameters' requires_grad (not registered
        # as submodules, so they are neither in state_dict nor moved by .to(); target modules share their
        # parameters with the adapters that wrap them)
        self._replaced = {t.name: t.module for t in targets} | {name: model.get_submodule(name) for name in heads}
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)

        generator = torch.Generator().manual_seed(config.seed)
        M, r, s, p = config.num_members, config.r, config.scaling, config.lora_dropout
        for t in targets:
            if t.kind == "linear":
                adapted: nn.Module = LoraEnsembleLinear(t.module, M, r, s, p)
            elif t.kind == "fused":
                adapted = LoraEnsembleFusedLinear(t.module, t.parts, M, r, s, p)
            else:
                adapted = LoraEnsembleMultiheadAttention(t.module, t.parts, t.adapt_out, M, r, s, p)
            for layer in adapted.modules():
                if isinstance(layer, (LoraEnsembleLinear, LoraEnsembleFusedLinear)):
                    init_lora_A(layer.lora_A, config.init, config.init_gain, config.init_std, generator)
            set_submodule(model, t.name, adapted)
        for name in heads:
            set_submodule(model, name, stack_head(model.get_submodule(name), M, config.head_init, generator, name))
        self.model = model
        self.target_names = [t.name for t in targets]
        self.head_names = heads
        self.row_contract = RowContract(M)
        sequence_first = bind_member_modules(model, self.row_contract)
        self.trunk_end = None  # with config.share_trunk: the first adapted block and every block after it
        if config.share_trunk and sequence_first:
            raise ValueError(f"share_trunk does not support sequence-first blocks ({sequence_first[0]!r} has "
                             "batch_first=False); use share_trunk=False")
        if config.share_trunk:
            first = min((t for t in targets if t.block is not None), key=lambda t: t.block, default=None)
            if first is None:
                raise ValueError("share_trunk needs adapted modules inside repeated blocks (e.g. encoder.layer.3)")
            names = block_names(model)
            self.trunk_end = names[names.index(first.block_name):]

    # ---- forward ----------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The wrapped model's own config (a Hugging Face `PretrainedConfig`; None for a model without one), as
        PEFT's `PeftModel.config`; the ensemble's is `ensemble_config`."""
        return getattr(self.model, "config", None)

    @property
    def num_members(self) -> int:
        return self.ensemble_config.num_members

    # Hugging Face Trainer: the loss below is a mean over the batch, so the Trainer divides it by the gradient
    # accumulation steps itself (and passes no num_items_in_batch)
    accepts_loss_kwargs = False
    return_dict = False  # ens.return_dict = True: every call returns the output object (what Trainer needs)

    def forward(self, *args: Any, labels: Tensor | None = None, return_dict: bool | None = None, **kwargs: Any) -> Any:
        """Run all members on one batch: inputs as for `model` (batch B), output the member outputs (M, B, ...).

        With `return_dict=True` (or `ens.return_dict = True`, for loops that call `ens(**batch)` themselves, such
        as Hugging Face `Trainer`), the model's own output object instead (e.g. a Hugging Face
        `SequenceClassifierOutput`; a `MemberOutput` for a model that returns a tensor) with `logits` the member
        logits (M, B, C) and, when `labels` (B,) are given, `loss` = 1/M sum_m CE(logits[m], labels) (the
        paper's loss, `member_cross_entropy`), so loops that read `.loss` (Hugging Face `Trainer`) train the
        ensemble unchanged. Other fields of the output keep the model's M*B rows. Without `return_dict`,
        `labels` are passed on to the model, repeated like every batched input."""
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this LoraEnsemble was unloaded (unload() gave its model back); wrap the model again")
        return_dict = self.return_dict if return_dict is None else return_dict
        if labels is not None and not return_dict:
            kwargs["labels"] = labels
        forward = None
        if self.trunk_end is not None and self.num_members > 1:
            if torch.is_grad_enabled() and gradient_checkpointing(self.model):
                raise ValueError(
                    "share_trunk does not work with gradient checkpointing: a checkpointed block is recomputed "
                    "in backward without the repeat of the batch at the first adapted block. Use one of them "
                    "(with share_trunk the frozen trunk blocks keep no activations for backward anyway)"
                )
            forward = self._shared_trunk
        if not return_dict:
            return run_members(self.model, args, kwargs, self.num_members, self.row_contract, forward=forward)
        output, member_logits = run_members(self.model, args, kwargs, self.num_members, self.row_contract,
                                            forward=forward, return_output=True)
        loss = None
        if labels is not None:
            if member_logits.dim() != 3:
                raise ValueError(
                    f"return_dict with labels computes the classification loss on member logits (M, B, C); this "
                    f"model's outputs are {tuple(member_logits.shape)}: compute the loss from them yourself"
                )
            loss = member_cross_entropy(member_logits, labels)
        return with_member_logits(output, member_logits, loss)

    def _shared_trunk(self, batch_size: int, args: tuple, kwargs: dict) -> Tensor:
        """(M*B, ...): inputs stay B rows until the first adapted block (see trunk.py)."""
        M = self.num_members
        output = shared_trunk_forward(self.model, self.trunk_end, M, batch_size, args, kwargs, self.row_contract)
        if output_tensor(output).shape[0] == batch_size != M * batch_size:
            raise ValueError(
                f"share_trunk: the model returned {batch_size} rows, not {M} members x batch {batch_size}: it "
                "combines the blocks' output with its original inputs (e.g. sequence classification that pools at "
                "the last non-padding token of input_ids, as Llama's does); use share_trunk=False for this model"
            )
        return output

    # ---- members ------------------------------------------------------------------------------------
    def member_parameters(self) -> dict[str, nn.Parameter]:
        """The per-member (trainable) parameters, by name inside `model`; each stacked with leading dim M."""
        owners = [n for n, m in self.model.named_modules() if isinstance(m, MemberModule)]
        result = {}
        for name, param in self.model.named_parameters():
            if any(name.startswith(o + ".") for o in owners) and param.requires_grad:
                result[name] = param
        return result

    def member(self, m: int) -> nn.Module:
        """A standalone model of the wrapped model's class: member m's adapters merged into the frozen
        weights and member m's head in place. `ens.member(m)(x)` equals `ens(x)[m]` to float tolerance."""
        return standalone_member(self.model, self.head_names, self.num_members, m)

    def unload(self) -> nn.Module:
        """The wrapped model as it was before `LoraEnsemble(model, ...)`: every adapter replaced by the module it
        wrapped (whose frozen weights never changed), the original heads back (as they were before training; the
        members' trained heads go with the ensemble), `requires_grad` of every parameter as before. As PEFT's
        `unload()`; the ensemble cannot be used afterwards. `member(m)` gives a model with member m merged."""
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this LoraEnsemble was already unloaded")
        model, dtype = self.model, frozen_dtype(self.model)
        for name, original in self._replaced.items():
            if name not in self.target_names:  # a head: where the model is now (it was not moved with it)
                original = original.to(device=next(model.get_submodule(name).parameters()).device, dtype=dtype)
            set_submodule(model, name, original)
        restore_transformer_fast_paths(model)
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self._unloaded = True
        self._replaced = {}
        return model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT counts them."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Prints `trainable params: ... || all params: ... || trainable%: ...`, in PEFT's wording."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def __repr__(self) -> str:
        c = self.ensemble_config
        patterns = sorted(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in self.target_names))
        targets = f"{len(self.target_names)} modules {patterns}"
        return (f"LoraEnsemble(num_members={c.num_members}, r={c.r}, scaling={c.scaling:g}, targets={targets}, "
                f"head={self.head_names}, share_trunk={c.share_trunk}, model={type(self.model).__name__})")

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `adapter_model.safetensors` (the per-member tensors only) and `lora_ensemble_config.json`
        (config + fingerprint of the base model) into folder `path`; each file is written atomically."""
        os.makedirs(path, exist_ok=True)
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.member_parameters().items()}
        atomic_write_bytes(os.path.join(path, WEIGHTS_NAME), safetensors_save(tensors, {"format": "pt"}))
        meta = {"format_version": FORMAT_VERSION, "config": self.ensemble_config.to_dict(), "base_model": self.base_fingerprint}
        atomic_write_bytes(os.path.join(path, CONFIG_NAME), json.dumps(meta, indent=2, sort_keys=True).encode())

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike) -> "LoraEnsemble":
        """Rebuild a saved ensemble on `model`, which must be the same base model it was trained on
        (same class and parameter shapes, else ValueError)."""
        path = resolve_checkpoint(path)
        config, expected = read_checkpoint_config(path)
        check_fingerprint(expected, fingerprint(model), path)
        ensemble = cls(model, config)
        ensemble.load_member_state(read_weights(os.path.join(path, WEIGHTS_NAME)), source=os.fspath(path))
        return ensemble

    def load_member_state(self, tensors: Mapping[str, Tensor], source: str = "state") -> None:
        """Copy per-member tensors (as written by `save_pretrained`) into this ensemble; every name and
        shape must match exactly, and nothing is copied unless all of them do."""
        params = self.member_parameters()
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        wrong = [f"{n}: {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
                 if n in tensors and tensors[n].shape != p.shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not fit this ensemble: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatches {wrong[:5]}"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])


class MemberOutput(dict):
    """What `ens(..., return_dict=True)` returns for a model whose output has no fields of its own (a tensor,
    a tuple): `logits` (M, B, ...) and, with labels, `loss`, as keys and as attributes (a dict, as Hugging
    Face's ModelOutput, so `Trainer` reads `outputs["loss"]`)."""

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in ("loss", "logits"):
            return None
        raise AttributeError(f"MemberOutput has no field {name!r}; it holds {list(self)}")


def with_member_logits(output: Any, member_logits: Tensor, loss: Tensor | None) -> Any:
    """`output` (the model's own output object) with `logits` = member_logits (M, B, ...) and `loss` set: the
    same class rebuilt for a dataclass output (Hugging Face's ModelOutput keeps its field order), a copy for
    a mapping, a MemberOutput for a tensor or tuple."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        if "logits" in fields and (loss is None or "loss" in fields):
            fields["logits"] = member_logits
            if loss is not None:
                fields["loss"] = loss
            return type(output)(**fields)
    if isinstance(output, Mapping) and "logits" in output:
        result = dict(output)
        result["logits"] = member_logits
        if loss is not None:
            result = {"loss": loss, **result}
        return type(output)(result) if isinstance(output, dict) and type(output) is not dict else result
    return MemberOutput(**({"loss": loss} if loss is not None else {}), logits=member_logits)


# ---- module surgery --------------------------------------------------------------------------------
SEQUENCE_FIRST_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer)
WINDOW_ATTENTION = re.compile(r"Swin|WindowAttention|WindowMultiHeadAttention")  # timm and HF Swin (v1, v2)


def bind_member_modules(model: nn.Module, contract: RowContract) -> list[str]:
    """Give every MemberModule of `model` the owner's row contract, its name, and its member axis: 1 inside a
    sequence-first torch Transformer block (batch_first=False: tensors (T, N, E)), else 0. Returns the names
    of the sequence-first blocks that hold member modules."""
    modules = dict(model.named_modules())
    sequence_first = []
    for name, module in modules.items():
        if not isinstance(module, MemberModule):
            continue
        module.row_contract, module.member_name = contract, name
        parts = name.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts) - 1, 0, -1)] + [model]
        module.folds_batch = any(WINDOW_ATTENTION.search(type(a).__name__) for a in ancestors)
        layout = next((a for a in ancestors if isinstance(a, SEQUENCE_FIRST_TYPES)), None)
        if layout is None or _batch_first(layout):
            continue
        block = next(n for n, mod in modules.items() if mod is layout)
        if block not in sequence_first:
            sequence_first.append(block)
        if isinstance(module, LoraEnsembleMultiheadAttention):
            continue  # member_axis follows its own batch_first
        if any(isinstance(a, LoraEnsembleMultiheadAttention) for a in ancestors):
            continue  # its projections receive (N, T, E): it transposes a sequence-first input itself
        module.member_axis = 1
    disable_transformer_fast_paths(model, [n for n, m in modules.items() if isinstance(m, MemberModule)])
    return sequence_first


def _batch_first(layer: nn.Module) -> bool:
    """nn.Transformer keeps `batch_first`; its encoder/decoder layers keep it on their self-attention."""
    if isinstance(layer, nn.Transformer):
        return layer.batch_first
    return layer.self_attn.batch_first


def _no_autocast() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether Hugging Face's (`gradient_checkpointing`) or timm's (`grad_checkpointing`) switch is on in `model`."""
    return any(getattr(m, "gradient_checkpointing", False) is True or getattr(m, "grad_checkpointing", False) is True
               for m in model.modules())


def frozen_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype that most frozen parameters of `model` have (None if there are none)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def standalone_member(model: nn.Module, head_names: list[str], num_members: int, m: int) -> nn.Module:
    """A copy of `model` (which holds member-aware modules) with member m alone: its heads (`member_head`, in
    the frozen weights' dtype) and every other member-aware module replaced by `member_module(m)`."""
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m < num_members:
        raise IndexError(f"member index must be an integer in 0..{num_members - 1}, got {m!r}")
    standalone = copy.deepcopy(model)
    dtype = frozen_dtype(standalone)
    with torch.no_grad(), _no_autocast():  # merge in the parameters' own precision, whatever the caller's
        for name in head_names:
            set_submodule(standalone, name, member_head(standalone.get_submodule(name), m, dtype))
        _merge_adapters(standalone, m)
    standalone.requires_grad_(True)
    return standalone


def _merge_adapters(module: nn.Module, m: int) -> None:
    """In place: replace every member-aware module (an adapter, after the heads) by its member m (`member_module`)."""
    for name, child in list(module.named_children()):
        if isinstance(child, MemberModule):
            module._modules[name] = child.member_module(m)
        else:
            _merge_adapters(child, m)


def read_checkpoint_config(path: str | os.PathLike) -> tuple[LoraEnsembleConfig, dict[str, Any]]:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: a LoRA-Ensemble checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
        return LoraEnsembleConfig.from_dict(meta["config"]), meta["base_model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a valid LoRA-Ensemble config file ({e})") from None


