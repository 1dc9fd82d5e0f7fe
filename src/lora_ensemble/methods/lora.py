"""`lora_ensemble` and `single_lora`: the core `LoraEnsemble`, with M members or with one.

Options are `LoraEnsembleConfig` fields (r, lora_alpha, target_modules, init, init_gain, head, ...), or
`config=LoraEnsembleConfig(...)` whole; `num_members` comes from the registry call (1 for `single_lora`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble

CONFIG_FIELDS = [f.name for f in dataclasses.fields(LoraEnsembleConfig) if f.name != "num_members"]


def _config(method: str, num_members: int, config: LoraEnsembleConfig | None, options: dict[str, Any]) -> LoraEnsembleConfig:
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; it accepts the LoraEnsembleConfig fields "
            f"{CONFIG_FIELDS} (or config=LoraEnsembleConfig(...))"
        )
    base = config if config is not None else LoraEnsembleConfig()
    return base.replace(num_members=num_members, **options)


def build_lora_ensemble(model: nn.Module, num_members: int = 4, config: LoraEnsembleConfig | None = None,
                        **options: Any) -> LoraEnsemble:
    """M LoRA members on the frozen `model` (see `LoraEnsemble`)."""
    return LoraEnsemble(model, _config("lora_ensemble", num_members, config, options))


def build_single_lora(model: nn.Module, num_members: int = 1, config: LoraEnsembleConfig | None = None,
                      **options: Any) -> LoraEnsemble:
    """One LoRA-adapted model with its own head; `num_members` is ignored (M = 1)."""
    return LoraEnsemble(model, _config("single_lora", 1, config, options))
