"""The tiny run config the compare tests share: tiny:text on a few BBC News articles, 2 LoRA members of rank 2."""

from __future__ import annotations

import copy
from typing import Any

BASE = {
    "seed": 0,
    "model": {"name": "tiny:text", "max_length": 16},
    "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "target_modules": "qkvo", "init_gain": 10.0},
    "data": {"name": "bbc_news", "batch_size": 4, "eval_batch_size": 8, "train_size": 8, "val_size": 4,
             "test_size": 8, "ood_size": 8, "max_chars": 200},
}


def tiny_compare_config(training: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """BASE with this `training` section (on the CPU) and the other top-level `sections` (compare:, tuning:)."""
    return {**copy.deepcopy(BASE), "training": {**training, "accelerator": "cpu"}, **copy.deepcopy(sections)}
