"""PEFT LoRA adapters <-> LoRA-Ensemble members, exactly.

    export_peft(ens, path)          member m -> path/member_<m>/{adapter_config.json, adapter_model.safetensors},
                                    so that PeftModel.from_pretrained(base, path/member_<m>) is member m
    from_peft(model, [folder_0, ..., folder_{M-1}])
                                    M PEFT LoRA adapters -> one LoraEnsemble whose member i is PeftModel + adapter i

A PEFT adapter on module W computes W x + s * B A x with A: (rank, in), B: (out, rank), s = alpha / rank
(alpha / sqrt(rank) with rsLoRA). The mapping, member m of an ensemble with scaling s:

    ensemble layer                    PEFT module                A                        B                  rank
    LoraEnsembleLinear                the Linear / Conv1D         A[m]                     B[m]               r
    LoraEnsembleFusedLinear (P parts) the fused qkv / c_attn      [A[m,0]; ..; A[m,P-1]]   block-diagonal     P*r
    LoraEnsembleMultiheadAttention    the nn.MultiheadAttention   in_proj as fused; its out_proj adapter zeros (below)
    per-member head                   modules_to_save             member m's head state

(block-diagonal: the rows of part p, columns p*r..(p+1)*r, hold B[m, p]; the other blocks are zero)

and alpha = s * rank, written through `rank_pattern` / `alpha_pattern` where the rank is not r (lora_alpha=None, i.e.
s = 1, writes alpha = rank). Import reverses it: adapter i of rank r_i is zero-padded to R = max r_i (zero rows of A
and columns of B add nothing) and its scaling folded into B (B <- s_i B, ensemble scaling 1); a PEFT adapter on a
fused q/k/v module becomes per-part adapters A_p = A, B_p = rows of part p of B.

Not exact in PEFT, hence refused: adapters on the out-projection of an nn.MultiheadAttention. PEFT (<= 0.21.2)
always gives an nn.MultiheadAttention's out_proj an adapter of the same rank, but adds its delta twice when it merges
it for the forward (W + 2 s B A; huggingface/peft PR #3774). Ensembles that adapt only the q/k/v slices of the
in-projection export exactly (out_proj adapter written as zeros); PEFT adapters whose out_proj B is non-zero are
refused on import. Also refused: DoRA and other LoRA variants, trained biases, and inits that change the base weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from lora_ensemble.core.attention import LoraEnsembleMultiheadAttention
from lora_ensemble.core.batch import MemberModule
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.heads import member_head, stack_head
from lora_ensemble.core.layers import (
    PART_INDEX,
    LoraEnsembleFusedLinear,
    LoraEnsembleLinear,
    is_conv1d,
    linear_features,
)
from lora_ensemble.core.targets import Target, find_heads, find_targets
from lora_ensemble.interop.peft_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MHA_OUT,
    PREFIX,
    PeftAdapter,
    read_peft_adapter,
)

# Fields the adapters decide; `from_peft` refuses overrides of them.
DERIVED_FIELDS = ("num_members", "r", "lora_alpha", "target_modules", "fused_parts", "layers", "head")


# ---- export ----------------------------------------------------------------------------------------
def export_peft(ens: LoraEnsemble, path: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Write every member of `ens` as a PEFT LoRA adapter folder `path/member_<m>`; returns the folders.

    `path` may be new, an empty folder, or a folder holding other files; a folder that already holds an
    adapter export (`member_<k>` folders or an adapter config) is refused unless `overwrite=True`, which
    replaces those entries and nothing else. Everything is written into a temporary folder next to `path`
    first: a new or empty `path` is then renamed into place in one step; into a folder with other files each
    complete member folder is renamed in, so no adapter folder is ever half-written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder; export_peft writes a folder of member adapters")
    previous = _previous_export(path)
    if previous and not overwrite:
        raise FileExistsError(f"{path} already holds an adapter export ({', '.join(previous[:3])}); pass "
                              "overwrite=True to replace it")
    layers = {name: ens.model.get_submodule(name) for name in ens.target_names}
    config = _export_config(ens, layers)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        for m in range(ens.num_members):
            folder = os.path.join(tmp, f"member_{m}")
            os.makedirs(folder)
            with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            with open(os.path.join(folder, ADAPTER_WEIGHTS), "wb") as f:
                f.write(safetensors_save(_member_tensors(ens, layers, m), {"format": "pt"}))
        _move_into_place(tmp, path, previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(path, f"member_{m}") for m in range(ens.num_members)]


def _export_rank(layer: nn.Module) -> int:
    if isinstance(layer, LoraEnsembleMultiheadAttention):
        fused = layer.in_proj if isinstance(layer.in_proj, LoraEnsembleFusedLinear) else None
        return len(fused.parts) * fused.r if fused is not None else layer.out_proj.r
    if isinstance(layer, LoraEnsembleFusedLinear):
        return len(layer.parts) * layer.r
    return layer.r


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _export_config(ens: Any, layers: dict[str, nn.Module]) -> dict[str, Any]:
    cfg: LoraEnsembleConfig = ens.ensemble_config
    r, s = cfg.r, cfg.scaling
    with_out = [n for n, l in layers.items()
                if isinstance(l, LoraEnsembleMultiheadAttention) and isinstance(l.out_proj, LoraEnsembleLinear)]
    if with_out:
        raise ValueError(
            f"cannot export {with_out[0]!r} exactly: the ensemble adapts the out_proj of an nn.MultiheadAttention, and "
            "PEFT's LoRA for nn.MultiheadAttention (peft <= 0.21.2) adds the out_proj delta twice (huggingface/peft "
            "PR #3774). Build the ensemble with target_modules='qkv' (or 'qv') to export it"
        )
    clashes = [(t, h) for t in layers for h in ens.head_names if t.endswith(h)]
    if clashes:  # PEFT wraps every module whose name ends with a modules_to_save entry
        raise ValueError(
            f"cannot export as PEFT: adapted module {clashes[0][0]!r} ends with head name {clashes[0][1]!r}, and "
            "PEFT's modules_to_save would wrap it too; build the ensemble with head names no adapted module ends with"
        )
    rank_pattern = {n: _export_rank(l) for n, l in layers.items() if _export_rank(l) != r}
    base = getattr(getattr(ens.model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": _number(s * r),
        "target_modules": list(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {n: _number(s * rank) for n, rank in rank_pattern.items()},
        "lora_dropout": cfg.lora_dropout,
        "fan_in_fan_out": any(is_conv1d(getattr(l, "base_layer", l)) for l in layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": list(ens.head_names) or None,
        "inference_mode": True,
    }


def _fused_tensors(layer: LoraEnsembleFusedLinear, m: int) -> tuple[Tensor, Tensor]:
    """Member m's per-part adapters as one rank-P*r adapter: A (P*r, in), B (3d, P*r) block-diagonal."""
    P, r, d = len(layer.parts), layer.r, layer.part_width
    A = layer.lora_A[m].reshape(P * r, layer.in_features)
    B = A.new_zeros(3 * d, P * r)
    for p, part in enumerate(layer.parts):
        i = PART_INDEX[part]
        B[i * d:(i + 1) * d, p * r:(p + 1) * r] = layer.lora_B[m, p]
    return A, B


def _member_tensors(ens: Any, layers: dict[str, nn.Module], m: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def put(module: str, A: Tensor, B: Tensor) -> None:
        out[f"{PREFIX}{module}.lora_A.weight"], out[f"{PREFIX}{module}.lora_B.weight"] = A, B

    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(layer, LoraEnsembleMultiheadAttention):
                rank, E = _export_rank(layer), layer.embed_dim
                w = layer.in_proj.weight if hasattr(layer.in_proj, "weight") else layer.in_proj.base_layer.weight
                if isinstance(layer.in_proj, LoraEnsembleFusedLinear):
                    put(name, *_fused_tensors(layer.in_proj, m))
                else:
                    put(name, w.new_zeros(rank, E), w.new_zeros(3 * E, rank))
                put(name + MHA_OUT, w.new_zeros(rank, E), w.new_zeros(E, rank))  # adapted out_proj refused above
            elif isinstance(layer, LoraEnsembleFusedLinear):
                put(name, *_fused_tensors(layer, m))
            else:
                put(name, layer.lora_A[m], layer.lora_B[m])
        for h in ens.head_names:
            for k, t in member_head(ens.model.get_submodule(h), m).state_dict().items():
                out[f"{PREFIX}{h}.{k}"] = t
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _previous_export(path: str) -> list[str]:
    """The entries of folder `path` that belong to an adapter export: member_<k> folders, adapter files."""
    if not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path)
                  if (e.startswith("member_") and os.path.isdir(os.path.join(path, e)))
                  or e in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def _move_into_place(tmp: str, path: str, previous: list[str]) -> None:
    """Put the member folders of `tmp` at `path`. A new or empty `path`: one rename (an existing folder keeps
    its permissions, a new one gets the umask's rather than mkdtemp's 0700). Otherwise each member folder is
    renamed in; the entries of a previous export (`previous`) are moved aside first and deleted after."""
    if not os.path.exists(path) or not os.listdir(path):
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o777 & ~_umask()
        os.rename(tmp, path)  # POSIX renames a folder onto an empty folder in one step
        os.chmod(path, mode)
        return
    aside = os.path.join(path, f".old-export-{uuid.uuid4().hex[:8]}")
    os.mkdir(aside)
    for entry in previous:
        os.rename(os.path.join(path, entry), os.path.join(aside, entry))
    moved = []
    try:
        for entry in sorted(os.listdir(tmp)):
            os.rename(os.path.join(tmp, entry), os.path.join(path, entry))
            moved.append(entry)
    except BaseException:  # put the previous export back as it was
        for entry in moved:
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
        for entry in previous:
            os.rename(os.path.join(aside, entry), os.path.join(path, entry))
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def from_peft(model: nn.Module, paths: list[str | os.PathLike], **overrides: Any) -> LoraEnsemble:
    """One ensemble from M separately trained PEFT LoRA adapters (folders or Hub ids) on the same targets;
    member i equals `PeftModel.from_pretrained(model, paths[i])` (see the module docstring for the mapping).
    `overrides`: other LoraEnsembleConfig fields (e.g. lora_dropout, seed). Everything is read and checked
    before `model` is touched."""
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f"paths must be a non-empty list of adapter folders, one per member, got {paths!r}")
    _check_base_model(model)
    bad = sorted(set(overrides) & set(DERIVED_FIELDS))
    if bad:
        raise ValueError(f"{bad} are decided by the adapters and cannot be overridden; allowed overrides are the other "
                         "LoraEnsembleConfig fields (e.g. lora_dropout, seed)")
    module_names = [n for n, _ in model.named_modules()]
    adapters = [read_peft_adapter(p, module_names) for p in paths]
    first = adapters[0]
    for a in adapters[1:]:
        _check_same(first.lora, a.lora, "targets different modules", first, a)
        _check_same(first.heads, a.heads, "saves different heads (modules_to_save)", first, a)
    _check_mha_out_proj_zero(adapters)

    target_names = [k for k in first.lora if not k.endswith(MHA_OUT)]
    rank = max(a.rank(module) for a in adapters for module in target_names)
    config = LoraEnsembleConfig(**{
        "lora_dropout": float(first.config.get("lora_dropout") or 0.0), "head_init": "copy", **overrides,
        "num_members": len(adapters), "r": rank, "lora_alpha": None, "target_modules": target_names,
        "fused_parts": ["q", "k", "v"], "layers": None, "head": sorted(first.heads) or None,
    })
    try:
        heads = find_heads(model, config)
        targets = find_targets(model, config, heads)
    except ValueError as e:
        raise ValueError(f"{first.weights_file}: the adapters do not fit this model: {e}") from None
    slots = _slots(targets)
    expected = {peft_key for peft_key, _, _ in slots.values()}
    expected |= {t.name + MHA_OUT for t in targets if t.kind == "mha"}  # in PEFT's files; checked zero above
    _check_same(dict.fromkeys(first.lora), dict.fromkeys(expected), "targets modules LoRA-Ensemble cannot adapt",
                first, None)
    _warn_other_base(model, first)

    tensors = _stack_lora(adapters, slots, rank)
    for head in heads:
        tensors.update(_head_tensors(model, head, adapters))
    ensemble = LoraEnsemble(model, config)
    ensemble.load_member_state(tensors, source=f"PEFT adapters {[a.folder for a in adapters]}")
    return ensemble


def _check_base_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_peft needs the base nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise TypeError("from_peft needs the plain base model, not a PeftModel; pass a freshly loaded base model")
    if any(isinstance(m, MemberModule) for m in model.modules()):
        raise ValueError("this model already carries LoRA-Ensemble adapters; load the adapters onto a fresh base model")


def _check_mha_out_proj_zero(adapters: list[PeftAdapter]) -> None:
    for module in (k for k in adapters[0].lora if k.endswith(MHA_OUT)):
        for a in adapters:
            if torch.count_nonzero(a.lora[module][1]):
                raise ValueError(
                    f"{a.weights_file}: the adapter on the out_proj of nn.MultiheadAttention "
                    f"{module[: -len(MHA_OUT)]!r} is not zero; PEFT (<= 0.21.2) adds that delta twice in its forward "
                    "(huggingface/peft PR #3774), so no ensemble reproduces it exactly. Only adapters whose out_proj "
                    "lora_B is zero can be loaded"
                )


def _stack_lora(adapters: list[PeftAdapter], slots: dict, rank: int) -> dict[str, Tensor]:
    """The ensemble's lora_A / lora_B: adapter i zero-padded from r_i to `rank`, its scaling folded into B."""
    M, tensors = len(adapters), {}
    for param, (peft_key, fused, (fan_in, fan_out)) in slots.items():
        A_all = torch.zeros(M, *((3,) if fused else ()), rank, fan_in)                # (M, [3,] R, in)
        B_all = torch.zeros(M, *((3, fan_out // 3) if fused else (fan_out,)), rank)   # (M, [3, d] | out, R)
        for i, a in enumerate(adapters):
            A, B = a.lora[peft_key]
            r_i = a.rank(peft_key)
            if A.shape[1:] == (fan_in,) and B.shape[:1] == (fan_out,) and (A.shape[0], B.shape[1]) != (r_i, r_i):
                raise ValueError(
                    f"{a.weights_file}: {peft_key!r} holds rank {A.shape[0]} (lora_A) / {B.shape[1]} (lora_B), but "
                    f"{os.path.join(a.folder, ADAPTER_CONFIG)} gives it rank {r_i}; the files do not belong together"
                )
            if A.shape != (r_i, fan_in) or B.shape != (fan_out, r_i):
                raise ValueError(
                    f"{a.weights_file}: {peft_key!r} holds lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but "
                    f"this model's module needs ({r_i}, {fan_in}) and ({fan_out}, {r_i}); the adapter was trained for "
                    "another base model"
                )
            B = a.scaling(peft_key) * B.float()
            if fused:  # every part p: A_p = A, B_p = rows of part p of B
                A_all[i, :, :r_i] = A.float()
                B_all[i, :, :, :r_i] = B.view(3, fan_out // 3, r_i)
            else:
                A_all[i, :r_i], B_all[i, :, :r_i] = A.float(), B
        tensors[param + ".lora_A"], tensors[param + ".lora_B"] = A_all, B_all
    return tensors


def _check_same(ref: dict, other: dict, what: str, a: PeftAdapter, b: PeftAdapter | None) -> None:
    missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
    if not (missing or extra):
        return
    if b is None:  # `other` are the modules the ensemble would adapt
        raise ValueError(f"{a.weights_file} {what}: adapted by PEFT but not adaptable here {missing[:5]}"
                         + (f", expected but missing {extra[:5]}" if extra else ""))
    raise ValueError(f"{b.weights_file} {what} than {a.weights_file}: missing {missing[:5]}, extra {extra[:5]}; all "
                     "members must adapt the same modules")


def _slots(targets: list[Target]) -> dict[str, tuple[str, bool, tuple[int, int]]]:
    """Ensemble parameter prefix -> (PEFT module name, fused?, (in, out)) for every adapter of `targets`."""
    slots = {}
    for t in targets:
        if t.kind == "mha":  # only its in-projection: an adapted out_proj is refused (module docstring)
            slots[t.name + ".in_proj"] = (t.name, True, (t.module.embed_dim, 3 * t.module.embed_dim))
        else:
            slots[t.name] = (t.name, t.kind == "fused", linear_features(t.module))
    return slots


def _head_tensors(model: nn.Module, head: str, adapters: list[PeftAdapter]) -> dict[str, Tensor]:
    module = model.get_submodule(head)
    try:
        stack_head(module, 1, "copy", torch.Generator(), head)  # dry run: can this head be stacked?
    except ValueError as e:
        raise ValueError(
            f"{adapters[0].weights_file}: modules_to_save module {head!r} cannot be a per-member head: {e}"
        ) from None
    params = {n: p.shape for n, p in module.named_parameters()}
    out = {}
    for a in adapters:
        saved = a.heads[head]
        missing = sorted(set(params) - set(saved))
        wrong = [f"{n}: {tuple(saved[n].shape)} vs {tuple(shape)}" for n, shape in params.items()
                 if n in saved and saved[n].shape != shape]
        if missing or wrong:
            raise ValueError(f"{a.weights_file}: head {head!r} does not fit this model: missing {missing}, shape "
                             f"mismatches {wrong}; the adapter was trained for another base model")
    for n in params:
        out[f"{head}.{n}"] = torch.stack([a.heads[head][n].float() for a in adapters])
    return out


def _warn_other_base(model: nn.Module, adapter: PeftAdapter) -> None:
    ours = getattr(getattr(model, "config", None), "_name_or_path", None)
    theirs = adapter.config.get("base_model_name_or_path")
    if ours and theirs and os.path.basename(os.path.normpath(ours)) != os.path.basename(os.path.normpath(theirs)):
        warnings.warn(f"{adapter.folder} was trained on {theirs!r} but the model given is {ours!r}", stacklevel=3)
