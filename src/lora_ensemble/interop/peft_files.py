"""Reading PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

`read_peft_adapter(folder, module_names)` checks that the folder holds a plain LoRA adapter and returns its LoRA
pairs by PEFT module name (A: (rank, in), B: (out, rank)) and the heads saved via `modules_to_save` by module
name; every error names the file at fault. Nothing here touches a model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_ensemble.io import read_weights, resolve_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."          # PEFT's prefix of every saved tensor name
MHA_OUT = ".base_layer.out_proj"      # where PEFT keeps the out-projection adapter of an nn.MultiheadAttention
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Config fields that must hold one of these values, else the adapter is not plain LoRA.
NEUTRAL = {
    "use_dora": (False, None), "use_qalora": (False, None), "lora_bias": (False, None), "bias": ("none", None),
    "use_bdlora": (False, None), "layer_replication": (None,), "trainable_token_indices": (None,),
    "target_parameters": (None, []), "alora_invocation_tokens": (None,), "velora_config": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "arrow_config": (None,),
}
# init_lora_weights values that change the base weights, so the adapter alone does not describe the model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class PeftAdapter:
    """One PEFT LoRA adapter folder, read and checked: LoRA pairs by PEFT module name, heads by module name."""

    folder: str
    weights_file: str
    config: dict[str, Any]
    lora: dict[str, tuple[Tensor, Tensor]]
    heads: dict[str, dict[str, Tensor]]

    def scaling(self, module: str) -> float:
        """s of the PEFT module `module` as PEFT computes it (rank_pattern / alpha_pattern, rsLoRA)."""
        c = self.config
        r = _pattern_value(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = _pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        return alpha / r ** 0.5 if c.get("use_rslora") else alpha / r

    def rank(self, module: str) -> int:
        return _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key` rule: the first pattern p with re.match(rf'(.*\\.)?({p})$', key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_peft_adapter(path: str | os.PathLike, module_names: list[str]) -> PeftAdapter:
    """Read and check one adapter folder (a local folder or a Hub id, see `resolve_checkpoint`).
    `module_names`: the names of the base model's modules (to find the heads saved via modules_to_save)."""
    folder = resolve_checkpoint(path, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    config_file = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} not found: a PEFT adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not a valid PEFT adapter config ({e})") from None
    _check_plain_lora(config, config_file)

    weights_file = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(weights_file):
        tensors = read_weights(weights_file)
    elif os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_BIN)):
        weights_file = os.path.join(folder, ADAPTER_WEIGHTS_BIN)
        try:
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict):
                raise TypeError(f"holds a {type(tensors).__name__}, not a dict of tensors")
        except Exception as e:
            raise ValueError(f"{weights_file} is not a readable PyTorch state dict ({e})") from None
    else:
        raise FileNotFoundError(
            f"{weights_file} not found (nor {ADAPTER_WEIGHTS_BIN}): the adapter folder {folder} has no weights"
        )

    lora: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, Tensor) or not key.startswith(PREFIX):
            raise ValueError(f"{weights_file}: entry {key!r} is not a tensor named {PREFIX}...; not a PEFT adapter")
        key = key[len(PREFIX):]
        if key.endswith(LORA_SUFFIXES):
            lora.setdefault(key[: -len(LORA_SUFFIXES[0])], {})[key[-len(LORA_SUFFIXES[0]):]] = t
        elif ".lora_" in key:
            raise ValueError(
                f"{weights_file}: tensor {key!r} is not plain LoRA (only lora_A.weight / lora_B.weight are supported)"
            )
        else:
            rest[key] = t
    pairs = {}
    for module, ab in lora.items():
        if len(ab) != 2:
            raise ValueError(f"{weights_file}: module {module!r} has {sorted(ab)} but needs lora_A and lora_B")
        pairs[module] = (ab[LORA_SUFFIXES[0]], ab[LORA_SUFFIXES[1]])
    if not pairs:
        raise ValueError(f"{weights_file} holds no LoRA weights")
    return PeftAdapter(folder, weights_file, config, pairs, _group_heads(rest, config, module_names, weights_file))


def _check_plain_lora(config: dict[str, Any], config_file: str) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') can be loaded"
        )
    for field, allowed in NEUTRAL.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(
                f"{config_file}: {field}={config[field]!r} is not supported; LoRA-Ensemble loads plain LoRA adapters "
                f"({field} must be {allowed[0]!r})"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{config_file}: init_lora_weights={init!r} changes the base model's weights, so the adapter alone does "
            "not describe the model; convert it to a plain LoRA adapter first (PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    for field in ("r", "lora_alpha"):
        value = config.get(field, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{config_file}: {field}={value!r} must be a positive number")


def _group_heads(rest: dict[str, Tensor], config: dict[str, Any], module_names: list[str], weights_file: str
                 ) -> dict[str, dict[str, Tensor]]:
    """The non-LoRA tensors by the module named in modules_to_save that holds them (PEFT: name.endswith(entry))."""
    entries = list(config.get("modules_to_save") or [])
    if config.get("task_type") == "SEQ_CLS":
        entries += ["classifier", "score"]  # PEFT adds these for sequence classification
    owners = [n for n in module_names if n and any(n.endswith(e) for e in entries)]
    heads: dict[str, dict[str, Tensor]] = {}
    for key, t in rest.items():
        found = [h for h in owners if key.startswith(h + ".")]
        if not found:
            raise ValueError(
                f"{weights_file}: tensor {key!r} is neither a LoRA weight nor part of a module of this model named in "
                f"modules_to_save {entries}; the adapter was saved for another base model or with unsupported extras"
            )
        head = min(found, key=len)
        heads.setdefault(head, {})[key[len(head) + 1:]] = t
    return heads
