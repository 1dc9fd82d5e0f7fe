"""The cases (`<method>/<mode>`), the targets, and `BenchmarkOptions`: what one benchmark run measures."""

from __future__ import annotations

from dataclasses import dataclass

from lora_ensemble.app.benchmark.workloads import MODELS

IMPLEMENTATIONS = ("limit", "lora_ensemble", "peft_mixed", "naive_loop", "vmap", "explicit")
CASES = tuple(f"{m}/{mode}" for m in IMPLEMENTATIONS for mode in ("inference", "train") if (m, mode) != ("peft_mixed", "train"))
PEERS = IMPLEMENTATIONS[2:]
TARGETS = (  # (name, numerator case, denominator case, bound, what is compared)
    ("inference <= 1.05 x limit", "lora_ensemble/inference", "limit/inference", 1.05, "median_s"),
    ("inference faster than PEFT mixed batches", "lora_ensemble/inference", "peft_mixed/inference", 1.0, "median_s"),
    ("train step <= 1.10 x limit forward+backward", "lora_ensemble/train", "limit/train", 1.10, "median_s"),
    ("peak train memory <= 1.10 x limit", "lora_ensemble/train", "limit/train", 1.10, "peak_bytes"),
)


@dataclass(frozen=True)
class BenchmarkOptions:
    """What one benchmark run measures; saved in the JSON so runs can be compared."""

    model: str = "minilm"
    batch_size: int = 8
    seq_len: int = 128
    num_members: int = 8
    r: int = 8
    target_modules: str = "qkvo"
    num_labels: int = 4
    cases: tuple[str, ...] = CASES
    warmup: int = 2  # untimed steps per case, the memory steps included
    repeats: int = 5
    device: str = "cpu"
    autocast: str | None = None  # "bfloat16" / "float16": forwards under torch.autocast (weights stay fp32)
    threads: int | None = None
    interleave: bool | None = None  # hold all cases, time them round by round; None = on CPU only
    memory_steps: int = 2  # first untimed train steps, where peak memory is measured (2: optimizer state
    #                        included; inference: 1); they count towards `warmup`
    rss: bool = False  # CPU: also the peak RSS growth of each case in a fresh subprocess (a cross-check)
    budget_s: float | None = None  # no new timed round (or case) after this many seconds; >= 1 timed step each
    seed: int = 0
    output: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases.split(",") if isinstance(self.cases, str) else self.cases))
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        for name in ("batch_size", "seq_len", "num_members", "r", "num_labels", "repeats", "memory_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        bad = [c for c in self.cases if c not in CASES]
        if bad or not self.cases:
            raise ValueError(f"unknown case(s) {bad or self.cases!r}; known cases: {list(CASES)}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
