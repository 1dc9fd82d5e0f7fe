"""`run_info.json`: what a run folder needs to turn raw inputs into predictions without its data set.

    {"format": 1, "class_names": ["business", "politics", ...], "modality": "text", "sample_rate": null,
     "preprocessing": {"model": "minilm", "max_length": 64, "image_size": null}}

`fit` writes it (atomically) next to `run_config.yaml`; `predict` reads the class names, the modality and
the sample rate from it instead of loading the training data, and `evaluate` checks that the data it loads has
the classes the run was trained on. The collate function is rebuilt from `preprocessing` (the tokenizer or
image/audio processor of the model, the token limit, the image side) and `sample_rate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lora_ensemble.app.run_config import ConfigError, ModelConfig
from lora_ensemble.io import atomic_write_bytes

INFO_FILE = "run_info.json"
FORMAT = 1


@dataclass(frozen=True)
class RunInfo:
    class_names: list[str]
    modality: str
    sample_rate: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_splits(cls, splits: Any, model: ModelConfig) -> "RunInfo":
        """The info of a run on `splits` (a DatasetSplits) with the model `model`."""
        return cls(list(splits.class_names), splits.modality, splits.sample_rate, preprocessing(model))

    def write(self, run_dir: str) -> None:
        data = {"format": FORMAT, **asdict(self)}
        atomic_write_bytes(os.path.join(run_dir, INFO_FILE), (json.dumps(data, indent=2) + "\n").encode())


def preprocessing(model: ModelConfig) -> dict[str, Any]:
    """What the collate function is built from, besides the modality and the sample rate."""
    return {"model": model.name, "max_length": model.max_length, "image_size": model.image_size}


def read_run_info(run_dir: str) -> RunInfo | None:
    """The run's info, or None for a run folder written before run_info.json existed."""
    path = os.path.join(run_dir, INFO_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expected format {FORMAT}")
        names = data["class_names"]
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ValueError("class_names must be a list of at least 2 names")
        return RunInfo([*names], str(data["modality"]), data.get("sample_rate"), dict(data.get("preprocessing") or {}))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is damaged ({e}); it is written by `lora-ensemble fit`") from None
