"""A training run as one validated YAML file: model, method, data, training.

    seed: 0
    model:    {name: minilm, max_length: 64}
    method:   {name: lora_ensemble, num_members: 4, r: 8, target_modules: qkvo}
    data:     {name: bbc_news, batch_size: 16, train_size: 400}
    training: {epochs: 3, lr: 1e-3, warmup_steps: 10}

`model` and `training` have fixed fields (below); `method` options go to
`lora_ensemble.methods.build_method`, `data` options (besides the batching fields) to
`lora_ensemble.app.data.load_dataset`, which check their own names. Unknown keys, wrong types and
missing files are reported as one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what is accepted."""


@dataclass
class ModelConfig:
    name: str = "minilm"               # 'minilm' (offline package), a local HF folder / hub id, 'timm:<name>',
    #                                    'torchvision:<name>', or 'tiny:<family>' (a tiny random model, for smoke tests)
    pretrained: bool = True
    max_length: int = 128              # text: tokens per input
    image_size: int | None = None      # images: resize side; None = the model's own
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the model constructor
    head: str | None = None            # decoder LLMs ('smollm2'): 'classifier' (default) or 'verbalizer' (app/llm.py)


@dataclass
class MethodConfig:
    name: str = "lora_ensemble"
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "bbc_news"
    batch_size: int = 16
    eval_batch_size: int | None = None
    num_workers: int = 0
    prompt: str | None = None          # decoder LLMs: the prompt template, {text} and {choices} (app/data/prompts.py)
    kind: str = "classification"       # 'classification' | 'multiple_choice': a decoder LLM scores each choice by its
    #                                    token log-likelihood after the question (prompts.ChoiceCollator, docs/llm.md)
    choice_score: str = "sum"          # multiple_choice: 'sum' (the choice's log-likelihood) or 'mean' (per token)
    options: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    epochs: int = 3
    max_epochs: int | None = None      # the epoch budget of a run trained to convergence (replaces `epochs` when set)
    early_stopping_patience: int | None = None  # stop after this many epochs without a lower val/nll; the best
    #                                    validation epoch's weights are restored before testing (needs val every epoch)
    max_steps: int = -1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    loss_reduction: str = "mean"
    class_weights: bool = False
    accumulate_grad_batches: int = 1
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    val_every_n_epochs: int = 1
    cache_trunk: bool = False  # keep the frozen trunk's outputs per training sample (needs method.share_trunk)
    temperature_scaling: bool = False
    checkpoint_every_n_steps: int = 100  # checkpoints/last.ckpt also every n optimizer steps (0: only at epoch ends)
    progress_bar: bool = True
    posterior: dict[str, Any] | None = None  # {method: swag|tfb, rank, start_epoch, collect_every_n_steps,
    #                                    max_nll_increase, swa_lr, include_heads}: posterior members saved in
    #                                    <run>/posterior (issue 15)

    @property
    def epoch_budget(self) -> int:
        """The most epochs a run trains: `max_epochs` when set, else `epochs`."""
        return self.max_epochs if self.max_epochs is not None else self.epochs


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **self.method.options}
        out["data"] = {k: v for k, v in out["data"].items() if k != "options"} | self.data.options
        return out


_OPEN_SECTIONS = {"method": MethodConfig, "data": DataConfig}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Accept `value` for type `hint` (ints for floats too), else ConfigError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = origin or hint
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs, options = {}, {}
    for key, value in data.items():
        if key in fields and key != "options":
            kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
        elif where in _OPEN_SECTIONS:
            options[key] = value  # checked by the method / dataset that receives them
        else:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(k for k in fields if k != 'options')}")
    if where in _OPEN_SECTIONS:
        kwargs["options"] = options
    return cls(**kwargs)


def parse_run_config(data: Any) -> RunConfig:
    """A RunConfig from a mapping (e.g. parsed YAML); raises ConfigError naming the bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a run config is a mapping with keys seed, model, method, data, training; got {type(data).__name__}")
    known = {"seed", "model", "method", "data", "training"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known keys: {sorted(known)}")
    seed = _check_type(data.get("seed", 0), int, "seed")
    cfg = RunConfig(
        seed=seed,
        model=_section(ModelConfig, data.get("model"), "model"),
        method=_section(MethodConfig, data.get("method"), "method"),
        data=_section(DataConfig, data.get("data"), "data"),
        training=_section(TrainingConfig, data.get("training"), "training"),
    )
    t = cfg.training
    if t.loss_reduction not in ("mean", "sum"):
        raise ConfigError(f"training.loss_reduction: expected 'mean' or 'sum', got {t.loss_reduction!r}")
    if t.max_epochs is not None and t.max_epochs < 1:
        raise ConfigError(f"training.max_epochs must be >= 1, got {t.max_epochs}")
    if t.early_stopping_patience is not None:
        if t.early_stopping_patience < 1:
            raise ConfigError(f"training.early_stopping_patience must be >= 1 (epochs), got {t.early_stopping_patience}")
        if t.val_every_n_epochs != 1:
            raise ConfigError("training.early_stopping_patience counts epochs and needs validation after every epoch "
                              f"(training.val_every_n_epochs: 1), got val_every_n_epochs {t.val_every_n_epochs}")
    if t.epoch_budget < 1 and t.max_steps < 1:
        raise ConfigError("training.epochs must be >= 1 (or set training.max_steps)")
    if t.checkpoint_every_n_steps < 0:
        raise ConfigError("training.checkpoint_every_n_steps must be >= 0 (0: a checkpoint only at the end of every "
                          f"epoch), got {t.checkpoint_every_n_steps}")
    if t.lr <= 0:
        raise ConfigError(f"training.lr must be > 0, got {t.lr}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    _check_bounds(cfg)
    _check_kind(cfg)
    if t.posterior is not None:
        t.posterior = posterior_settings(t.posterior, cfg.method.name)
    return cfg


DATA_KINDS = ("classification", "multiple_choice")
CHOICE_SCORES = ("sum", "mean")


def _check_kind(cfg: RunConfig) -> None:
    """data.kind and data.choice_score name known values; choice_score other than the default needs multiple_choice."""
    d = cfg.data
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind: expected one of {list(DATA_KINDS)}, got {d.kind!r}")
    if d.choice_score not in CHOICE_SCORES:
        raise ConfigError(f"data.choice_score: expected one of {list(CHOICE_SCORES)}, got {d.choice_score!r}")
    if d.kind != "multiple_choice" and d.choice_score != "sum":
        raise ConfigError(f"data.choice_score: {d.choice_score!r} scores the choices of data.kind: multiple_choice; "
                          f"this run has data.kind: {d.kind}")


POSTERIOR_DEFAULTS = {"method": "swag", "rank": 5, "start_epoch": 0, "collect_every_n_steps": 0, "max_nll_increase": 0.003,
                      "swa_lr": None, "include_heads": None}


def _yaml_float(value: Any) -> Any:
    """A number YAML read as a string (it reads 3e-3, without a dot, as one) as a float; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def posterior_settings(value: dict[str, Any], method: str) -> dict[str, Any]:
    """training.posterior with every key filled in (POSTERIOR_DEFAULTS) and checked; ConfigError naming the key."""
    unknown = sorted(set(value) - set(POSTERIOR_DEFAULTS))
    if unknown:
        raise ConfigError(f"training.posterior: unknown key(s) {unknown}; known keys: {sorted(POSTERIOR_DEFAULTS)}")
    out = {**POSTERIOR_DEFAULTS, **value}
    if out["method"] not in ("swag", "tfb"):
        raise ConfigError(f"training.posterior.method: expected 'swag' or 'tfb', got {out['method']!r}")
    for key, low in (("rank", 1), ("start_epoch", 0), ("collect_every_n_steps", 0)):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < low:
            raise ConfigError(f"training.posterior.{key} must be an integer >= {low}, got {out[key]!r}")
    eps = out["max_nll_increase"] = _yaml_float(out["max_nll_increase"])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ConfigError(f"training.posterior.max_nll_increase must be a number > 0, got {eps!r}")
    swa_lr = out["swa_lr"] = _yaml_float(out["swa_lr"])
    if swa_lr is not None and (not isinstance(swa_lr, (int, float)) or isinstance(swa_lr, bool) or not swa_lr > 0):
        raise ConfigError(f"training.posterior.swa_lr must be a number > 0 (or null), got {swa_lr!r}")
    if swa_lr is not None and out["method"] != "swag":
        raise ConfigError("training.posterior.swa_lr is the constant learning rate of SWAG's collection phase; "
                          f"method {out['method']!r} collects nothing")
    if out["include_heads"] is not None and not isinstance(out["include_heads"], bool):
        raise ConfigError(f"training.posterior.include_heads must be true, false or null, got {out['include_heads']!r}")
    if out["include_heads"] and out["method"] != "swag":
        raise ConfigError("training.posterior.include_heads is SWAG's: method 'tfb' perturbs the A matrices alone")
    if method not in ("lora_ensemble", "single_lora"):
        raise ConfigError(f"training.posterior is over the members of a LoRA-Ensemble (methods lora_ensemble, "
                          f"single_lora); method {method!r} has none")
    return out


# (key, lowest accepted value); None values mean "not set" and are accepted
_BOUNDS = [("model.max_length", 1), ("model.image_size", 1), ("data.eval_batch_size", 1), ("data.num_workers", 0),
           ("training.max_steps", -1), ("training.weight_decay", 0), ("training.warmup_steps", 0),
           ("training.grad_clip", 0), ("training.accumulate_grad_batches", 1), ("training.num_nodes", 1),
           ("training.val_every_n_epochs", 1)]


def _check_bounds(cfg: RunConfig) -> None:
    """The numbers with a floor, checked here so a bad one never reaches the trainer (after files are written)."""
    for key, low in _BOUNDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:
            what = "-1 (no limit) or >= 1" if key == "training.max_steps" else f">= {low}"
            raise ConfigError(f"{key} must be {what}, got {value}")
    if cfg.training.max_steps == 0:
        raise ConfigError("training.max_steps must be -1 (no limit) or >= 1, got 0")


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` like ['training.epochs=1', 'method.num_members=2'] are applied
    first (values parsed as YAML)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {os.fspath(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{os.fspath(path)} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {yaml_problem(e)}") from None
    if data is not None and not isinstance(data, dict):
        return parse_run_config(data)  # raises: names what a run config is
    return parse_run_config(apply_overrides(data or {}, overrides or []))


def yaml_problem(error: yaml.YAMLError) -> str:
    """'line L, column C: <problem>' of a YAML parse error (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section (`model:` with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    return data
