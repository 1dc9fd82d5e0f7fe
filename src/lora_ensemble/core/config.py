"""`LoraEnsembleConfig`: what a LoRA-Ensemble is, as a validated, JSON-serializable dataclass.

Field names follow PEFT's `LoraConfig` where the idea is the same (`r`, `lora_alpha`, `target_modules`,
`lora_dropout`); the rest (`num_members`, `layers`, `init`, `head`, ...) are specific to ensembles.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from lora_ensemble.core.batch import check_num_members
from lora_ensemble.io import atomic_write_bytes

CONFIG_NAME = "lora_ensemble_config.json"

INITS = ("xavier_uniform", "kaiming_uniform", "gaussian")
HEAD_INITS = ("random", "copy")
FUSED_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class LoraEnsembleConfig:
    """Configuration of a LoRA-Ensemble (Halbheer et al., arXiv 2405.14438).

    Member m adapts every targeted projection W (out x in) to W + s * B_m A_m with A_m: (r, in),
    B_m: (out, r) and s = lora_alpha / r (s = 1 when `lora_alpha` is None, as in the paper).
    """

    num_members: int = field(default=4, metadata={"help": "Number of ensemble members M (>= 1)."})
    r: int = field(default=8, metadata={"help": "LoRA rank of every adapter (>= 1)."})
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "Scaling numerator: s = lora_alpha / r. None means s = 1 (the paper: no alpha scaling)."},
    )
    target_modules: str | list[str] = field(
        default="qkvo",
        metadata={
            "help": "Which projections get adapters: a preset ('qv', 'qkv', 'qkvo', 'all-linear'), a regex "
            "(a string that is not a preset, matched against the full module name), or a list of module "
            "names or name suffixes (e.g. ['query', 'value'])."
        },
    )
    fused_parts: list[str] = field(
        default_factory=lambda: ["q", "k", "v"],
        metadata={
            "help": "For fused q/k/v projections named in an explicit `target_modules` list (timm `qkv`, GPT-2 "
            "`c_attn`, nn.MultiheadAttention): which slices get their own rank-r adapter. Presets choose "
            "their own slices."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the blocks that get adapters (negative counts from the end); None = all."},
    )
    init: str = field(
        default="xavier_uniform",
        metadata={"help": f"Initialisation of A, one of {INITS}. B always starts at zero."},
    )
    init_gain: float = field(default=10.0, metadata={"help": "Gain of the xavier_uniform init (paper: 10)."})
    init_std: float | None = field(
        default=None, metadata={"help": "Std of the gaussian init; None means 1 / r (as PEFT)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the members' random draws (adapters and heads)."})
    head: str | list[str] | None = field(
        default="auto",
        metadata={
            "help": "Dotted name(s) of the output module(s) replaced by M independent heads. 'auto' finds a "
            "classification head (classifier, score, head, heads, fc); None = no per-member head (the "
            "default for causal LMs: a language-model head is never replicated unless named)."
        },
    )
    share_trunk: bool = field(
        default=False,
        metadata={
            "help": "Run the blocks before the first adapted block once on the B original rows and repeat the "
            "hidden states member-major only from there on (same outputs, less compute when `layers` leaves "
            "early blocks frozen). Needs a model whose code after the blocks does not index by its inputs."
        },
    )
    head_init: str = field(
        default="random",
        metadata={"help": "'random': every member head is drawn anew (nn.Linear's init); 'copy': all start "
                  "as copies of the model's head."},
    )

    def __post_init__(self) -> None:
        # Normalise list-like fields so JSON round trips and equality work.
        if isinstance(self.target_modules, (list, tuple)):
            object.__setattr__(self, "target_modules", list(self.target_modules))
        object.__setattr__(self, "fused_parts", list(self.fused_parts))
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                object.__setattr__(self, "layers", [self.layers])
            else:
                object.__setattr__(self, "layers", list(self.layers))
        if isinstance(self.head, (list, tuple)):
            object.__setattr__(self, "head", list(self.head))
        self._validate()

    def _validate(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        check_num_members(self.num_members)
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.lora_alpha is not None and (
            not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0
        ):
            raise ValueError(f"lora_alpha must be a positive number or None, got {self.lora_alpha!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError("target_modules must not be empty")
        elif not tm or not all(isinstance(t, str) and t for t in tm):
            raise ValueError(f"target_modules must be a preset, a regex or a non-empty list of names, got {tm!r}")
        bad = [p for p in self.fused_parts if p not in FUSED_PARTS]
        if bad or not self.fused_parts or len(set(self.fused_parts)) != len(self.fused_parts):
            raise ValueError(f"fused_parts must be distinct entries of {list(FUSED_PARTS)}, got {self.fused_parts!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers is not None and (not self.layers or not all(is_int(i) for i in self.layers)):
            raise ValueError(f"layers must be None or a non-empty list of block indices, got {self.layers!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if not isinstance(self.init_gain, (int, float)) or self.init_gain <= 0:
            raise ValueError(f"init_gain must be > 0, got {self.init_gain!r}")
        if self.init_std is not None and (not isinstance(self.init_std, (int, float)) or self.init_std <= 0):
            raise ValueError(f"init_std must be > 0 or None, got {self.init_std!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        head = self.head
        if head is not None and not (
            (isinstance(head, str) and head) or (isinstance(head, list) and head and all(isinstance(h, str) and h for h in head))
        ):
            raise ValueError(f"head must be 'auto', a dotted module name, a list of names or None, got {head!r}")
        if not isinstance(self.share_trunk, bool):
            raise ValueError(f"share_trunk must be true or false, got {self.share_trunk!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {list(HEAD_INITS)}, got {self.head_init!r}")

    @property
    def scaling(self) -> float:
        """s in W + s * B A: lora_alpha / r, or 1.0 when lora_alpha is None."""
        return 1.0 if self.lora_alpha is None else float(self.lora_alpha) / self.r

    def replace(self, **changes: Any) -> "LoraEnsembleConfig":
        """A copy with some fields changed (and validated)."""
        return dataclasses.replace(self, **changes)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraEnsembleConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a LoraEnsembleConfig is read from a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoraEnsembleConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; with `path`, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_bytes(path, text.encode())
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "LoraEnsembleConfig":
        """Read a config from a JSON file (or a JSON string)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text, encoding="utf-8") as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a valid LoraEnsembleConfig JSON ({path_or_text!s:.80}): {e}") from None
        return cls.from_dict(data)


