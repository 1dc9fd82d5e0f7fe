"""`lora-ensemble compare`: several methods on the same data, budget rule and seeds, each tuned on validation
first; one table of mean ± 95 % interval and the paired differences to LoRA-Ensemble.

    lora-ensemble compare --config configs/compare_bbc_minilm.yaml --seeds 3 --output-dir runs/compare
        [--trials N] [--storage URL] [--jobs N]

Protocol, per method (in the order given): the tuning stage (`tuning.py`: an Optuna study over its learning
rate and its one knob, each trial trained on the training split and scored by validation NLL, no test loader),
then its seeds with the best setting, each tested once. A rerun of the same command resumes: finished trials
(the study in <output_dir>/tuning.db) and finished final runs (same config, compare_run.json ok) are kept.
Statistics (`stats.py`): mean ± t_{0.975,n-1} s / sqrt(n) over seeds for every metric; for NLL, ECE and Brier
the paired bootstrap over test samples of lora_ensemble - method (2000 resamples, seed 0).

The YAML is a run config (see `run_config`) plus an optional top-level `compare:` mapping of per-method
overrides, each a partial run config merged over the base for that method only:

    compare:
      single:     {training: {lr: 1e-4}}                   # full fine-tuning wants a smaller lr than LoRA
      mc_dropout: {training: {lr: 1e-4}, method: {dropout: 0.1}}

Run (method m, seed index i) = the base config with `method.name = m`, minus the base method options m does
not take (LoRA's `r` for `single`), with `compare.m` merged on top, `seed = base seed + i`, progress bars off;
it trains into `output_dir/m/seed<i>`. The data split is the same for every run (data options are not varied).

Before any training: unknown method names are refused (listing the known ones), every run config is
validated, and each method is built once on the model; a method that cannot be built (e.g. mc_dropout on a
model without dropout) is not run and its row says why. A run that fails later gets a row with its error.

Peak memory: each run trains in a fresh process (`python -m lora_ensemble.app.compare --one RUN_DIR`) that
reports its own `ru_maxrss`, the peak resident set of the process: model, data, activations, optimizer
state, plus the interpreter and libraries every run pays alike (`baseline_rss_bytes` in results.json is that
part, measured before the run). On CUDA it adds `torch.cuda.max_memory_allocated`. A fresh process also
keeps one run's crash or out-of-memory kill away from the others. `isolate=False` runs in this process
(faster for tests; no CPU peak memory then).

Output folder:
    results.md, results.csv    the tuning table; one row per method, mean ± 95 % interval over seeds (csv: mean, std,
                               ci95); a failed run adds a row with its error; the paired bootstrap table
    tuning.db                  the Optuna studies (unless --storage); tuning/<method>/trial<k>/ the trials' folders
    results.json               every run's full results and config, the aggregate, the command
    figures/                   `report.write_figures` of seed 0: all methods on shared axes; reliability_all.png (the
                               reliability diagrams side by side), nll_vs_train_time.png, nll_vs_memory.png
    <method>/seed<i>/          the run folder (see `runner`) + test_outputs.safetensors, compare_run.json, log.txt
"""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import inspect
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any

import yaml

import lora_ensemble
from lora_ensemble.app.run_config import ConfigError, RunConfig, apply_overrides, parse_run_config
from lora_ensemble.io import atomic_write_bytes
from lora_ensemble.methods import METHODS, accepts_option
from lora_ensemble.methods.lora import CONFIG_FIELDS as LORA_FIELDS

OUTPUTS_FILE = "test_outputs.safetensors"
STATUS_FILE = "compare_run.json"
LOG_FILE = "log.txt"

# (column title, key in an aggregate row, format); rows hold (mean, std) tuples over seeds
COLUMNS = [
    ("acc", "acc", ".3f"), ("F1", "f1", ".3f"), ("ECE", "ece", ".3f"), ("NLL", "nll", ".3f"),
    ("Brier", "brier", ".3f"), ("OOD AUROC (entropy)", "ood/auroc_entropy", ".3f"),
    ("OOD AUROC (MI)", "ood/auroc_mi", ".3f"), ("AURC", "sc/aurc", ".3f"),
    ("disagreement", "div/disagreement", ".3f"), ("trainable params", "trainable_parameters", ",.0f"),
    ("params in memory", "total_parameters", ",.0f"), ("train s", "train_time_s", ".1f"),
    ("infer ms/sample", "inference_ms_per_sample", ".2f"), ("peak MB", "peak_memory_mb", ".0f"),
    ("epochs", "epochs_run", ".1f"), ("best epoch", "best_epoch", ".1f"), ("seeds", "seeds", "s"),
]


# ---- configs --------------------------------------------------------------------------------------------
def read_compare_config(path: str | os.PathLike, overrides: list[str] | None = None,
                        with_tuning: bool = False) -> tuple[dict, dict] | tuple[dict, dict, Any]:
    """(base run config as a dict, per-method overrides[, the raw `tuning:` section]) from a YAML file;
    `overrides` ('a.b=v', also 'compare.explicit.training.lr=1e-4') are applied first."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {os.fspath(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)}: a run config is a mapping, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    tuning = data.pop("tuning", None)
    per_method = data.pop("compare", None) or {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"compare: expected a mapping of method name -> overrides, got {per_method!r}")
    for name, section in per_method.items():
        if name not in METHODS:
            raise ConfigError(f"compare.{name}: unknown method; known methods: {sorted(METHODS)}")
        if not isinstance(section, dict) or "name" in (section.get("method") or {}):
            raise ConfigError(f"compare.{name}: expected a partial run config (e.g. {{training: {{lr: 1e-4}}}}) "
                              f"that does not change method.name, got {section!r}")
    parse_run_config(copy.deepcopy(data))  # the base must be valid on its own
    return (data, per_method, tuning) if with_tuning else (data, per_method)


def takes_option(method: str, option: str, options: dict[str, Any]) -> bool:
    """Whether `method` takes method option `option`. Builders with named options say so themselves
    (`accepts_option`); their `**options`, where present, are LoraEnsembleConfig fields, which a builder
    with a `lora` switch (mc_dropout) takes only when `options` turn it on."""
    if option == "num_members":
        return True
    params = inspect.signature(METHODS[method]).parameters
    if option in params and params[option].kind is not inspect.Parameter.VAR_KEYWORD:
        return True
    if not accepts_option(method, option):
        return False
    if "lora" in params and not options.get("lora"):
        return False
    return option in LORA_FIELDS or option == "config"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def method_config(base: dict, per_method: dict, method: str, seed_index: int,
                  params: dict[str, Any] | None = None) -> tuple[RunConfig, list[str]]:
    """The run config of (method, seed index) and the base method options dropped for it; `params` (tuned
    values, see `tuning.PARAMETERS`) are set last."""
    extra = copy.deepcopy(per_method.get(method) or {})
    base_options = {k: v for k, v in (base.get("method") or {}).items() if k != "name"}
    flags = {**base_options, **(extra.get("method") or {})}
    dropped = sorted(k for k in base_options if not takes_option(method, k, flags))
    raw = copy.deepcopy(base)
    raw["method"] = {"name": method, **{k: v for k, v in base_options.items() if k not in dropped}}
    raw = _merge(raw, extra)
    if params:
        from lora_ensemble.app.tuning import apply_params

        raw = apply_params(raw, params)
    raw["seed"] = int(raw.get("seed", 0)) + seed_index
    raw.setdefault("training", {})["progress_bar"] = False
    try:
        return parse_run_config(raw), dropped
    except ConfigError as e:
        raise ConfigError(f"{method}: {e}") from None


# ---- one run ----------------------------------------------------------------------------------------------
def _error_line(e: BaseException) -> str:
    """The first line of the error, after its type (a ConfigError's message already names the key)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if isinstance(e, ConfigError) and first else f"{type(e).__name__}: {first}".strip()


def train_one(config: RunConfig, run_dir: str, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one run into `run_dir`, save its test outputs; never raises: returns {'status': 'ok', 'results'}
    or {'status': 'failed', 'error' (first line), 'traceback'}. `evaluate_test=False` (a tuning trial):
    validation only, the test split is never loaded into a loader."""
    from safetensors.torch import save_file

    from lora_ensemble.app.runner import fit

    try:
        results, run = fit(config, run_dir, overwrite=True, evaluate_test=evaluate_test)
        if not evaluate_test:
            return {"status": "ok", "results": results}
        logits, labels, ood = run.module.last_outputs["test"]
        tensors = {"member_logits": logits.contiguous(), "labels": labels.contiguous()}
        if ood is not None:
            tensors["ood_member_logits"] = ood.contiguous()
        save_file(tensors, os.path.join(run_dir, OUTPUTS_FILE))
        return {"status": "ok", "results": results}
    except Exception as e:  # noqa: BLE001 - a failed run is reported in its row, never hidden
        return {"status": "failed", "error": _error_line(e), "traceback": traceback.format_exc()}


def _child_main(run_dir: str, evaluate_test: bool = True) -> int:
    """`python -m lora_ensemble.app.compare --one RUN_DIR [--trial]`: train RUN_DIR/run_config.yaml, write
    compare_run.json (`--trial`: validation only)."""
    import torch

    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import CONFIG_FILE  # imports Lightning and transformers: part of the baseline

    baseline = _rss_now()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        status = train_one(load_run_config(os.path.join(run_dir, CONFIG_FILE)), run_dir, evaluate_test)
    except ConfigError as e:
        status = {"status": "failed", "error": _error_line(e), "traceback": traceback.format_exc()}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    status.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                  baseline_rss_bytes=baseline)
    if cuda:
        status["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated()
    atomic_write_bytes(os.path.join(run_dir, STATUS_FILE), json.dumps(status, indent=2).encode())
    return 0 if status["status"] == "ok" else 1


def _rss_now() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def run_isolated(config: RunConfig, run_dir: str, evaluate_test: bool = True) -> dict[str, Any]:
    """Train in a fresh Python process; its output goes to run_dir/log.txt."""
    from lora_ensemble.app.runner import CONFIG_FILE

    os.makedirs(run_dir, exist_ok=True)
    status_path = os.path.join(run_dir, STATUS_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(status_path)  # never read a previous compare's result
    atomic_write_bytes(os.path.join(run_dir, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    src = os.path.dirname(os.path.dirname(os.path.abspath(lora_ensemble.__file__)))  # the folder that holds the package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               TOKENIZERS_PARALLELISM="false")
    with open(os.path.join(run_dir, LOG_FILE), "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "lora_ensemble.app.compare", "--one", run_dir,
                               *([] if evaluate_test else ["--trial"])], stdout=log, stderr=subprocess.STDOUT, env=env)
    if os.path.isfile(status_path):
        with open(status_path, encoding="utf-8") as f:
            return json.load(f)
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode in (-9, 137):
        why += " (out of memory?)"
    return {"status": "failed", "error": f"the run process ended without a result ({why}); see {run_dir}/{LOG_FILE}"}


def run_in_process(config: RunConfig, run_dir: str, evaluate_test: bool = True) -> dict[str, Any]:
    """Train in this process; peak memory only on CUDA (this process's RSS high-water mark is not the run's)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return {**train_one(config, run_dir, evaluate_test), "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def preflight(config: RunConfig) -> str | None:
    """Build data, model and method once (no training); the error line, or None when it builds."""
    from lora_ensemble.app.runner import build_run

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_run(config)  # model loading reports are noise here; the run's log.txt keeps them
    except Exception as e:  # noqa: BLE001 - shown in the method's row
        return _error_line(e)
    finally:
        gc.collect()
    return None


# ---- tables ------------------------------------------------------------------------------------------------
def _scalars(status: dict[str, Any]) -> dict[str, float]:
    from lora_ensemble.app.tables import flat_row  # imported here: a run's process needs no plotting library

    row = flat_row(status["results"])
    if "inference_time_per_sample_s" in row:
        row["inference_ms_per_sample"] = row["inference_time_per_sample_s"] * 1000
    if status.get("peak_memory_bytes") is not None:
        row["peak_memory_bytes"] = status["peak_memory_bytes"]
        row["peak_memory_mb"] = status["peak_memory_bytes"] / 2**20
    for key in ("epochs_run", "best_epoch"):
        if status["results"].get(key) is not None:
            row[key] = status["results"][key]
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{key: {mean, std, ci95, n}} over the successful runs; std is the sample std (0 for one run), ci95 the
    half-width of the 95 % Student-t interval of the mean (`stats.seed_interval`; None for one run)."""
    from lora_ensemble.app.stats import seed_interval

    ok = [_scalars(r) for r in runs if r["status"] == "ok"]
    out = {}
    for key in sorted({k for row in ok for k in row}):
        values = [row[key] for row in ok if key in row]
        mean, half = seed_interval(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": var ** 0.5, "ci95": half, "n": len(values)}
    return out


def table_rows(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per method (mean ± half-width of the 95 % t-interval over seeds, or one value when every seed
    agrees or there is one seed), plus a row per failed run; a method whose runs all failed with one error
    gets that error as its only row."""
    rows: dict[str, dict[str, Any]] = {}
    for method, method_runs in runs.items():
        failed = [(i, r) for i, r in enumerate(method_runs) if r["status"] != "ok"]
        if len(failed) == len(method_runs) and len({r["error"] for _, r in failed}) == 1:
            rows[method] = {"error": _cell_text(failed[0][1]["error"])}
            continue
        if len(failed) < len(method_runs):
            stats = aggregate(method_runs)
            row: dict[str, Any] = {k: s["mean"] if s["n"] == 1 or s["std"] == 0 else (s["mean"], s["ci95"])
                                   for k, s in stats.items()}
            row["seeds"] = f"{len(method_runs) - len(failed)}/{len(method_runs)}"
            rows[method] = row
        for i, r in failed:
            rows[f"{method} (seed{i})"] = {"error": _cell_text(r["error"])}
    return rows


def _cell_text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def csv_text(runs: dict[str, list[dict[str, Any]]]) -> str:
    keys = [key for _, key, _ in COLUMNS if key != "seeds"]
    extra = sorted({k for rs in runs.values() for k in aggregate(rs)} - set(keys))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seeds_ok", "seeds", "errors"]
                    + [f"{k}_{s}" for k in keys + extra for s in ("mean", "std", "ci95")])
    for method, method_runs in runs.items():
        stats = aggregate(method_runs)
        errors = "; ".join(f"seed{i}: {r['error']}" for i, r in enumerate(method_runs) if r["status"] != "ok")
        ok = sum(r["status"] == "ok" for r in method_runs)
        cells = [stats[k][s] if k in stats and stats[k][s] is not None else ""
                 for k in keys + extra for s in ("mean", "std", "ci95")]
        writer.writerow([method, ok, len(method_runs), errors] + cells)
    return out.getvalue()


def _test_probs(run: dict[str, Any]) -> tuple[Any, Any]:
    """(ensemble probabilities (N, C), labels (N,)) of a finished run's saved test outputs."""
    from safetensors.torch import load_file

    from lora_ensemble.metrics import predictive

    t = load_file(os.path.join(run["run_dir"], OUTPUTS_FILE))
    return predictive(t["member_logits"]).probs, t["labels"]


def paired_differences(runs: dict[str, list], reference: str = "lora_ensemble", n_boot: int = 2000,
                       seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {stat: {diff, low, high, real}}}: the paired bootstrap (`stats.paired_bootstrap`) of
    reference - method over the test samples, each side averaged over its successful seeds."""
    from lora_ensemble.app.stats import paired_bootstrap

    ok = {m: [r for r in rs if r is not None and r["status"] == "ok"] for m, rs in runs.items()}
    if not ok.get(reference):
        return {}
    ref = [_test_probs(r) for r in ok[reference]]
    labels = ref[0][1]
    out = {}
    for method, method_runs in ok.items():
        if method == reference or not method_runs:
            continue
        other = [_test_probs(r) for r in method_runs]
        if any(not bool((y == labels).all()) for _, y in other):
            continue  # not the same test samples: no paired comparison
        out[method] = paired_bootstrap([p for p, _ in ref], [p for p, _ in other], labels, n_boot=n_boot, seed=seed)
    return out


def paired_table(diffs: dict[str, dict[str, dict[str, float]]], reference: str = "lora_ensemble") -> str:
    lines = [f"| {reference} - method | NLL | ECE | Brier |", "|---|---|---|---|"]
    for method, d in diffs.items():
        cells = [f"{d[s]['diff']:+.3f} [{d[s]['low']:+.3f}, {d[s]['high']:+.3f}]{' *' if d[s]['real'] else ''}"
                 for s in ("nll", "ece", "brier")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(tuned: dict[str, dict[str, Any]]) -> str:
    from lora_ensemble.app.tuning import format_params

    lines = ["| method | trials (finished/all) | best setting | best val NLL | trials' time s |", "|---|---|---|---|---|"]
    for method, t in tuned.items():
        trials = t.get("trials", [])
        finished = sum(x["state"] == "COMPLETE" for x in trials)
        wall = sum(x.get("wall_time_s") or 0 for x in trials)
        best = format_params(t["best"]) if t.get("best") else f"failed: {_cell_text(t.get('error', '?'))}"
        value = f"{t['best_value']:.4f}" if t.get("best_value") is not None else "-"
        lines.append(f"| {method} | {finished}/{len(trials)} | {best} | {value} | {wall:.0f} |")
    return "\n".join(lines)


# ---- the comparison ------------------------------------------------------------------------------------------
def run_trial(config: RunConfig, run_dir: str, isolate: bool) -> dict[str, Any]:
    """One tuning trial: train on the training split, validation only (no test loader is built)."""
    return run_isolated(config, run_dir, evaluate_test=False) if isolate else run_in_process(config, run_dir, False)


def _finished_run(config: RunConfig, run_dir: str) -> dict[str, Any] | None:
    """The result of an earlier compare's run in run_dir with this very config (a rerun resumes), else None."""
    from lora_ensemble.app.runner import CONFIG_FILE

    status_path, saved = os.path.join(run_dir, STATUS_FILE), os.path.join(run_dir, CONFIG_FILE)
    if not (os.path.isfile(status_path) and os.path.isfile(saved) and os.path.isfile(os.path.join(run_dir, OUTPUTS_FILE))):
        return None
    try:
        with open(status_path, encoding="utf-8") as f:
            status = json.load(f)
        with open(saved, encoding="utf-8") as f:
            same = yaml.safe_load(f) == config.to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return status if same and status.get("status") == "ok" else None


def run_compare(config_path: str, methods: list[str] | None = None, seeds: int = 3, output_dir: str = "runs/compare",
                overrides: list[str] | None = None, isolate: bool = True, trials: int | None = None,
                storage: str | None = None, jobs: int = 1) -> dict[str, Any]:
    """Tune (when the config has a `tuning:` section or `trials` > 0), train every (method, seed) of the
    config, write results.md/.csv/.json and figures into `output_dir`; returns what results.json holds.
    `methods=None` means every registered method. A rerun of the same command resumes: finished trials and
    finished final runs (same config) are kept."""
    from lora_ensemble.app.tuning import default_storage, format_params, parse_tuning, tune_method

    methods = list(methods) if methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known methods: {sorted(METHODS)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and not isolate:
        raise ConfigError("--jobs > 1 runs trials in worker processes; it needs isolated runs")
    overrides = list(overrides or [])
    base, per_method, tuning_section = read_compare_config(config_path, overrides, with_tuning=True)
    tuning = parse_tuning(tuning_section, methods, trials)
    configs = {m: [method_config(base, per_method, m, i) for i in range(seeds)] for m in methods}
    if tuning is not None:  # every trial's config must be valid too: check the range ends before anything trains
        for m in methods:
            for corner in ("low", "high"):
                params = {n: (int(getattr(r, corner)) if r.integer else getattr(r, corner))
                          for n, r in tuning.space[m].items()}
                method_config(base, per_method, m, 0, params)
    own_storage = storage is None
    storage = storage or default_storage(output_dir)
    command = shlex.join(["lora-ensemble", "compare", "--config", os.fspath(config_path), "--methods", ",".join(methods),
                          "--seeds", str(seeds), "--output-dir", os.fspath(output_dir)]
                         + (["--trials", str(trials)] if trials is not None else [])
                         + (["--storage", storage] if not own_storage else []) + (["--jobs", str(jobs)] if jobs > 1 else [])
                         + (["--set", *overrides] if overrides else []))
    summary: dict[str, Any] = {
        "command": command, "argv": sys.argv, "config_path": os.fspath(config_path), "overrides": overrides,
        "config": {**base, "compare": per_method, "tuning": tuning_section}, "methods": methods, "seeds": seeds,
        "isolate": isolate, "storage": storage if tuning is not None else None,
        "peak_memory": "ru_maxrss of a fresh process per run (includes interpreter + libraries: baseline_rss_bytes)"
                       if isolate else "torch.cuda.max_memory_allocated on CUDA, else not measured (in-process)",
        "tuning": {}, "runs": {}, "aggregate": {}, "paired": {}, "figures": [],
    }
    start = time.perf_counter()
    log = lambda text: print(text, flush=True)  # noqa: E731
    runs: dict[str, list[dict[str, Any] | None]] = {m: [None] * seeds for m in methods}
    for method in methods:  # build each method once before any training
        config, dropped = configs[method][0]
        note = f" (dropped method options {dropped}: not taken by {method})" if dropped else ""
        error = preflight(config)
        log(f"check {method}: {'builds' if error is None else 'cannot run: ' + error}{note}")
        if error is not None:
            runs[method] = [{"status": "failed", "error": error, "stage": "build", "seed": c.seed}
                            for c, _ in configs[method]]
    if all(runs[m][0] is not None for m in methods):
        _write_tables(output_dir, summary, runs, configs)
        raise ConfigError(f"no method can run on this config: {runs[methods[0]][0]['error']} (see {output_dir}/results.md)")
    os.makedirs(output_dir, exist_ok=True)
    total = sum(r is None for m in methods for r in runs[m])
    n = 0
    # method by method (its tuning, then its seeds): an interrupted comparison has whole methods; rows are
    # rewritten after each run
    for method in methods:
        if runs[method][0] is not None:
            continue
        if tuning is not None:
            def trial(params: dict[str, Any], number: int, method: str = method) -> dict[str, Any]:
                config, _ = method_config(base, per_method, method, 0, params)
                return run_trial(config, os.path.join(output_dir, "tuning", method, f"trial{number}"), isolate)

            fingerprint = {"search space": {k: r.to_dict() for k, r in tuning.space[method].items()},
                           "run config": configs[method][0][0].to_dict()}
            result = tune_method(method, tuning, storage, f"{os.path.basename(os.path.abspath(output_dir))}/{method}",
                                 fingerprint, own_storage, trial, jobs=jobs, log=log)
            summary["tuning"][method] = result
            if result["best"] is None:
                runs[method] = [{"status": "failed", "error": f"tuning: {result['error']}", "stage": "tuning",
                                 "seed": c.seed} for c, _ in configs[method]]
                log(f"tune {method}: {result['error']}")
                _write_tables(output_dir, summary, runs, configs)
                continue
            log(f"tune {method}: best {format_params(result['best'])} (trial {result['best_trial']}, "
                f"val NLL {result['best_value']:.4f})")
            configs[method] = [method_config(base, per_method, method, i, result["best"]) for i in range(seeds)]
        for i in range(seeds):
            n += 1
            config, _ = configs[method][i]
            run_dir = os.path.join(output_dir, method, f"seed{i}")
            t0 = time.perf_counter()
            status = _finished_run(config, run_dir)
            resumed = status is not None
            if status is None:
                status = run_isolated(config, run_dir) if isolate else run_in_process(config, run_dir)
                status.update(run_dir=run_dir, seed=config.seed, wall_time_s=time.perf_counter() - t0)
            runs[method][i] = status
            if status["status"] == "ok":
                res = status["results"]
                m = res["metrics"]
                epochs = f", epochs {res.get('epochs_run')}" + (f" (best {res['best_epoch']})" if res.get("best_epoch") else "")
                done = f"test NLL {m['nll']:.4f}, ECE {m['ece']:.3f}, acc {m['acc']:.3f}{epochs}"
            else:
                done = f"FAILED: {status['error']}"
            log(f"[{n}/{total}] {method} seed{i}: {status['wall_time_s']:.0f} s{' (finished before)' if resumed else ''}, {done}")
            _write_tables(output_dir, summary, runs, configs)
    summary["paired"] = paired_differences(runs)
    table = _write_tables(output_dir, summary, runs, configs)
    summary["figures"] = _write_figures(output_dir, runs, summary)
    summary["total_time_s"] = time.perf_counter() - start
    atomic_write_bytes(os.path.join(output_dir, "results.json"), json.dumps(summary, indent=2).encode())
    log("\n" + table)
    log(f"\nwrote results.md, results.csv, results.json and {len(summary['figures'])} figures to {output_dir}/ "
        f"in {summary['total_time_s'] / 60:.1f} min")
    return summary


def _write_tables(output_dir: str, summary: dict[str, Any], runs: dict[str, list], configs: dict) -> str:
    """Rewrite the three result files from the runs finished so far (pending runs are left out); returns
    the Markdown text (tuning table, results table, paired differences)."""
    finished = {m: [r for r in rs if r is not None] for m, rs in runs.items()}
    finished = {m: rs for m, rs in finished.items() if rs}
    summary["runs"] = {m: [{**r, "config": configs[m][i][0].to_dict()} for i, r in enumerate(rs) if r is not None]
                       for m, rs in runs.items()}
    summary["aggregate"] = {m: aggregate(rs) for m, rs in finished.items()}
    from lora_ensemble.app.tables import markdown_table

    baselines = sorted(r["baseline_rss_bytes"] for rs in finished.values() for r in rs if r.get("baseline_rss_bytes"))
    memory = (f"peak RSS of the run's own process, of which ~{baselines[len(baselines) // 2] / 2**20:.0f} MB is Python, "
              "torch and Lightning before the run loads anything" if baselines else summary["peak_memory"])
    header = (f"<!-- {summary['command']} -->\n\nmean ± half-width of the 95 % Student-t interval over seeds "
              f"(one value: every seed agreed or one seed); peak MB: {memory}\n\n")
    text = header
    if summary.get("tuning"):
        text += "Tuning (validation NLL, test split unused):\n\n" + tuning_table(summary["tuning"]) + "\n\n"
    table = markdown_table(table_rows(finished), COLUMNS)
    text += table + "\n"
    if summary.get("paired"):
        text += ("\nPaired bootstrap over test samples (2000 resamples, seed 0) of lora_ensemble - method, each "
                 "averaged over its seeds: difference [95 % interval]; * = the interval excludes 0 (negative: "
                 "lora_ensemble lower, i.e. better)\n\n" + paired_table(summary["paired"]) + "\n")
    atomic_write_bytes(os.path.join(output_dir, "results.md"), text.encode())
    atomic_write_bytes(os.path.join(output_dir, "results.csv"), csv_text(finished).encode())
    atomic_write_bytes(os.path.join(output_dir, "results.json"), json.dumps(summary, indent=2).encode())
    return text


def _write_figures(output_dir: str, runs: dict[str, list], summary: dict[str, Any] | None = None) -> list[str]:
    """`report.write_figures` of each method's first successful seed, all methods together; the reliability
    diagrams side by side; NLL against training time and against peak memory (mean ± 95 % interval)."""
    from safetensors.torch import load_file

    from lora_ensemble.app import plots
    from lora_ensemble.app.tables import write_figures
    from lora_ensemble.metrics import predictive

    outputs = {}
    for method, method_runs in runs.items():
        ok = next((r for r in method_runs if r is not None and r["status"] == "ok"), None)
        if ok is not None:
            t = load_file(os.path.join(ok["run_dir"], OUTPUTS_FILE))
            outputs[method] = (t["member_logits"], t["labels"], t.get("ood_member_logits"))
    if not outputs:
        return []
    folder = os.path.join(output_dir, "figures")
    highlight = "lora_ensemble" if "lora_ensemble" in outputs else None
    written = [str(p) for p in write_figures(outputs, folder, highlight=highlight)]
    written.append(str(plots.reliability_grid({m: (predictive(o[0]).probs, o[1]) for m, o in outputs.items()},
                                              os.path.join(folder, "reliability_all.png"))))
    stats = (summary or {}).get("aggregate") or {m: aggregate([r for r in rs if r is not None]) for m, rs in runs.items()}
    for x_key, x_label, name in (("train_time_s", "training time (s)", "nll_vs_train_time.png"),
                                 ("peak_memory_mb", "peak memory (MB)", "nll_vs_memory.png")):
        points = {m: (s[x_key]["mean"], s[x_key]["ci95"], s["nll"]["mean"], s["nll"]["ci95"])
                  for m, s in stats.items() if x_key in s and "nll" in s}
        if points:
            written.append(str(plots.cost_plot(points, os.path.join(folder, name), x_label, "test NLL")))
    return written


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "--one" or sys.argv[3:] not in ([], ["--trial"]):
        sys.exit("usage: python -m lora_ensemble.app.compare --one RUN_DIR [--trial]   (one run of `lora-ensemble compare`)")
    sys.exit(_child_main(sys.argv[2], evaluate_test=sys.argv[3:] != ["--trial"]))
