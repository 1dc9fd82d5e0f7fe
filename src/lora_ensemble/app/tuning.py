"""The tuning stage of `lora-ensemble compare`: per method, an Optuna study over its learning rate and its one knob.

A compare config may hold a `tuning:` section (its absence, or `--trials 0`, skips the stage):

    tuning:
      trials: 4                 # trials per method (finished trials of a resumed study count)
      seed: 0                   # the sampler's seed, plus crc32(method) (TPE; random search for its first 10 trials)
      space:                    # per method, parameter -> [low, high] (or {low, high, log}); merged over DEFAULT_SPACE
        lora_ensemble: {lr: [1.0e-3, 1.0e-2], init_gain: [1.0, 10.0]}
      start:                    # settings every study tries first (Optuna's enqueue_trial), per method
        lora_ensemble: [{lr: 2.0e-3, init_gain: 10.0}]
        lora_ensemble+swag: [{lr: 2.0e-3, init_gain: 10.0}]   # a posterior row: its base's space, its own study

Parameters (PARAMETERS): `lr` -> training.lr (log scale), `init_gain` -> method.init_gain (LoRA's Xavier gain,
log), `init_std` -> method.init_std (BatchEnsemble's fast-weight spread, log), `dropout` -> method.dropout and
method.attention_dropout (MC dropout's rate, linear), `cycles` -> method.cycles (snapshot's cycle count, integer).

A trial trains (method, seed index 0) with the sampled values on the training split and is scored by its
validation NLL (the lowest of its epochs under early stopping, whose weights it keeps; a `<base>+swag` row: the
validation NLL of its K draws per member around those weights, see `compare.train_one`); the test split's loader
is never built in a trial (`runner.fit(evaluate_test=False)`). The trial with the lowest score is the method's
setting for the final runs. Trials that fail are recorded as failed trials (and shown) and do not count.

Storage: `sqlite:///<output_dir>/tuning.db` unless `--storage URL` (any RDB URL SQLAlchemy takes, e.g.
postgresql://...); one study per method, named `<study prefix>/<method>`. A rerun of the same command resumes:
trials already finished are not run again, only the missing ones are. In the default SQLite file, trials left
RUNNING by a killed compare are marked failed first (that file has one owner); in a shared `--storage` they are
left to their owners. `--jobs N` runs N trials at a time, each in its own process.
"""

from __future__ import annotations

import copy
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.posterior.posterior import POSTERIOR_METHODS

# name -> (config keys it sets, value type, log scale)
PARAMETERS: dict[str, tuple[tuple[str, ...], type, bool]] = {
    "lr": (("training.lr",), float, True),
    "init_gain": (("method.init_gain",), float, True),
    "init_std": (("method.init_std",), float, True),
    "dropout": (("method.dropout", "method.attention_dropout"), float, False),
    "cycles": (("method.cycles",), int, False),
}
# the parameters each method has, and the default range of each (a range holds the values of the paper / the
# hand-picked configs: LoRA lr 2e-3 and gain 10, full fine-tuning lr 1e-4, dropout 0.1, init_std 0.1, M cycles)
DEFAULT_SPACE: dict[str, dict[str, tuple[float, float]]] = {
    "single": {"lr": (1e-5, 5e-4)},
    "explicit": {"lr": (1e-5, 5e-4)},
    "snapshot": {"lr": (3e-5, 1e-3), "cycles": (4, 8)},
    "mc_dropout": {"lr": (1e-5, 5e-4), "dropout": (0.05, 0.3)},
    "single_lora": {"lr": (5e-4, 1e-2), "init_gain": (0.5, 20.0)},
    "lora_ensemble": {"lr": (5e-4, 1e-2), "init_gain": (0.5, 20.0)},
    "batch_ensemble": {"lr": (5e-4, 2e-2), "init_std": (0.01, 0.3)},
}
# a posterior row `<base>+<posterior>` of compare (issue 15) trains like its base and is tuned over the same space,
# in a study of its own; its score is documented at `compare.train_one` (SWAG: the validation NLL of its K draws
# per member; TFB: the trained members' validation NLL, since sigma is calibrated on that very split)
POSTERIOR_BASES = ("lora_ensemble", "single_lora")
DEFAULT_SPACE.update({f"{base}+{post}": dict(DEFAULT_SPACE[base]) for base in POSTERIOR_BASES
                      for post in POSTERIOR_METHODS})
DEFAULT_TRIALS = 4


@dataclass
class Range:
    low: float
    high: float
    log: bool
    integer: bool

    def distribution(self) -> Any:
        import optuna

        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log, "integer": self.integer}


@dataclass
class Tuning:
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    space: dict[str, dict[str, Range]] = field(default_factory=dict)      # method -> parameter -> range
    start: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # method -> settings tried first


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def parse_range(method: str, name: str, spec: Any) -> Range:
    where = f"tuning.space.{method}.{name}"
    if name not in DEFAULT_SPACE[method]:
        raise ConfigError(f"{where}: unknown parameter for {method}; it tunes {sorted(DEFAULT_SPACE[method])}")
    _, kind, log = PARAMETERS[name]
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"low", "high", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: expected [low, high] or {{low, high, log}}, got {spec!r}")
        low, high, log = spec["low"], spec["high"], spec.get("log", log)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    elif isinstance(spec, (list, tuple)) and len(spec) == 2:
        low, high = spec
    else:
        raise ConfigError(f"{where}: expected [low, high] or {{low, high, log}}, got {spec!r}")
    low, high = _number(low, f"{where} low"), _number(high, f"{where} high")
    if kind is int and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: {name} is an integer; got the range [{low:g}, {high:g}]")
    if not low < high:
        raise ConfigError(f"{where}: empty range [{low:g}, {high:g}] (needs low < high)")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-scale range needs low > 0, got [{low:g}, {high:g}]")
    if name in ("dropout",) and not (0 <= low and high < 1):
        raise ConfigError(f"{where}: a dropout rate lies in [0, 1), got [{low:g}, {high:g}]")
    return Range(low, high, log, kind is int)


def parse_tuning(section: Any, methods: list[str], trials: int | None = None) -> Tuning | None:
    """The `tuning:` section checked against `methods` (ConfigError naming the key); None when there is no
    tuning stage (no section and no `trials`, or trials == 0)."""
    if section is None and not trials:
        return None
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"tuning: expected a mapping with keys trials, seed, space, start; got {section!r}")
    unknown = sorted(set(section) - {"trials", "seed", "space", "start"})
    if unknown:
        raise ConfigError(f"tuning: unknown key(s) {unknown}; known keys: ['seed', 'space', 'start', 'trials']")
    n = section.get("trials", DEFAULT_TRIALS) if trials is None else trials
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"tuning.trials must be an integer >= 0, got {n!r}")
    if n == 0:
        return None
    from lora_ensemble.extras import require

    require("compare", "optuna", feature="the tuning stage of compare")  # ImportError naming the extra
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"tuning.seed must be an integer, got {seed!r}")
    space_section, start_section = section.get("space") or {}, section.get("start") or {}
    for key, value in (("space", space_section), ("start", start_section)):
        if not isinstance(value, dict):
            raise ConfigError(f"tuning.{key}: expected a mapping of method name -> ..., got {value!r}")
        for method in value:
            if method not in DEFAULT_SPACE:
                raise ConfigError(f"tuning.{key}.{method}: unknown method; known methods: {sorted(DEFAULT_SPACE)}")
    tuning = Tuning(trials=n, seed=seed)
    for method in methods:
        given = space_section.get(method) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"tuning.space.{method}: expected a mapping parameter -> [low, high], got {given!r}")
        merged = {name: list(r) for name, r in DEFAULT_SPACE[method].items()} | dict(given)
        tuning.space[method] = {name: parse_range(method, name, spec) for name, spec in merged.items()}
        starts = start_section.get(method) or []
        if not isinstance(starts, list) or not all(isinstance(s, dict) for s in starts):
            raise ConfigError(f"tuning.start.{method}: expected a list of settings like [{{lr: 1.0e-3}}], got {starts!r}")
        checked = []
        for i, setting in enumerate(starts):
            where = f"tuning.start.{method}[{i}]"
            missing = sorted(set(tuning.space[method]) - set(setting))
            extra = sorted(set(setting) - set(tuning.space[method]))
            if missing or extra:
                raise ConfigError(f"{where}: a setting names every parameter of {method} "
                                  f"{sorted(tuning.space[method])}; missing {missing}, unknown {extra}")
            values = {}
            for name, value in setting.items():
                r = tuning.space[method][name]
                v = _number(value, f"{where}.{name}")
                if not r.low <= v <= r.high:
                    raise ConfigError(f"{where}.{name}: {v:g} lies outside the search range [{r.low:g}, {r.high:g}]")
                values[name] = int(v) if r.integer else v
            checked.append(values)
        tuning.start[method] = checked
    return tuning


def apply_params(raw: dict, params: dict[str, Any]) -> dict:
    """A copy of the run config mapping `raw` with each parameter's config keys set."""
    out = copy.deepcopy(raw)
    for name, value in params.items():
        for key in PARAMETERS[name][0]:
            section, leaf = key.split(".")
            out.setdefault(section, {})[leaf] = value
    return out


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(params.items()))


# ---- the study ------------------------------------------------------------------------------------------------
def default_storage(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "tuning.db"))


def open_study(storage: str, name: str, space: dict[str, Range], seed: int, fingerprint: dict[str, Any],
               own_storage: bool, upgrade: dict[str, Callable[[Any], Any]] | None = None) -> Any:
    """Create or load the study `name`; a loaded study must have been made with the same space and config
    (`fingerprint`), else ConfigError. `upgrade[key]` maps the saved fingerprint's entry `key` before the
    comparison (a run config saved by an earlier version gets the defaults of options added since). In
    storage this compare owns, trials left RUNNING are marked FAIL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by our own line
    # each study its own stream: methods with the same space (single, explicit) do not draw the same values
    sampler = optuna.samplers.TPESampler(seed=seed + zlib.crc32(name.rsplit("/", 1)[-1].encode()))
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                    load_if_exists=True)
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable database: one line naming it
        raise ConfigError(f"--storage {storage!r}: cannot open the study ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    saved = study.user_attrs.get("fingerprint")
    if saved is not None and upgrade:
        saved = {k: upgrade[k](v) if k in upgrade else v for k, v in saved.items()}
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ConfigError(f"the study {name!r} in {storage} was made with another {' and '.join(changed)}; "
                          "use another --output-dir (or --storage) for a changed config")
    if own_storage:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return study


class TrialFailed(Exception):
    """A trial whose run failed (its error is the message); recorded by Optuna as a failed trial."""


def tune_method(method: str, tuning: Tuning, storage: str, study_name: str, fingerprint: dict[str, Any],
                own_storage: bool, run_trial: Callable[[dict[str, Any], int], dict[str, Any]], jobs: int = 1,
                log: Callable[[str], None] = print,
                upgrade: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Run the missing trials of `method`'s study; returns {'best': params, 'best_value', 'best_trial',
    'trials': [one summary per trial]} (best None when no trial finished).

    `run_trial(params, number)` trains one trial and returns {'status': 'ok', 'results': {...,
    'best_val_nll'}} or {'status': 'failed', 'error'}; its score is results['best_val_nll']."""
    import optuna
    from optuna.trial import TrialState

    space = tuning.space[method]
    study = open_study(storage, study_name, space, tuning.seed, fingerprint, own_storage, upgrade)
    for setting in tuning.start.get(method, []):
        study.enqueue_trial(setting, skip_if_exists=True)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done:
        log(f"tune {method}: {done}/{tuning.trials} trials already finished in {storage}")

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for name, r in space.items():
            if r.integer:
                params[name] = trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
            else:
                params[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
        t0 = time.perf_counter()
        status = run_trial(params, trial.number)
        wall = time.perf_counter() - t0
        trial.set_user_attr("wall_time_s", wall)
        if status["status"] != "ok":
            trial.set_user_attr("error", status["error"])
            log(f"tune {method} trial {trial.number}: {format_params(params)} -> FAILED: {status['error']} ({wall:.0f} s)")
            raise TrialFailed(status["error"])
        res = status["results"]
        value = res.get("best_val_nll")
        if value is None or not math.isfinite(value):
            trial.set_user_attr("error", f"validation NLL {value}")
            log(f"tune {method} trial {trial.number}: {format_params(params)} -> FAILED: validation NLL {value}")
            raise TrialFailed(f"validation NLL {value}")
        for key in ("epochs_run", "best_epoch", "train_time_s", "val_nll_history"):
            if res.get(key) is not None:
                trial.set_user_attr(key, res[key])
        acc = (res.get("val_metrics") or {}).get("val/acc")
        trial.set_user_attr("val_acc", acc)
        epochs = f", epochs {res.get('epochs_run')}" + (f" (best {res['best_epoch']})" if res.get("best_epoch") else "")
        log(f"tune {method} trial {trial.number}: {format_params(params)} -> val NLL {value:.4f}"
            + (f", val acc {acc:.3f}" if acc is not None else "") + f"{epochs}, {wall:.0f} s")
        return float(value)

    remaining = tuning.trials - done
    if remaining > 0:
        stop = optuna.study.MaxTrialsCallback(tuning.trials, states=(TrialState.COMPLETE,))
        # failed trials do not count: try up to twice the budget before giving up
        study.optimize(objective, n_trials=2 * remaining, n_jobs=jobs, catch=(TrialFailed,), callbacks=[stop],
                       gc_after_trial=True)
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
                       **{k: v for k, v in t.user_attrs.items()}})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        errors = sorted({t.user_attrs.get("error", "?") for t in study.get_trials(deepcopy=False)})
        return {"best": None, "best_value": None, "best_trial": None, "trials": trials,
                "error": f"no trial finished ({'; '.join(errors)[:300]})"}
    best = min(complete, key=lambda t: (t.value, t.number))
    params = {name: (int(v) if space[name].integer else float(v)) for name, v in best.params.items()}
    return {"best": params, "best_value": best.value, "best_trial": best.number, "trials": trials}
