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

Posterior rows (issue 15), named `<base>+<posterior>` with base a LoRA method (lora_ensemble, single_lora) and
posterior swag or tfb: `lora_ensemble+swag`, `lora_ensemble+tfb`, `single_lora+swag` (SWAG-LoRA: the same code
with M = 1), `single_lora+tfb`. Not in the default method list: name them in --methods. Such a row trains exactly
like its base (the base's config, `compare.<row>` merged on top, the base's tuning space in a study of its own,
`tuning.space.<row>` / `tuning.start.<row>`) with `training.posterior` set (`default_posterior`: SWAG rank 5,
collected from epoch min(budget // 2, patience) four times an epoch; TFB calibrated at the end of training on the
validation split, around the restored best epoch's weights), and is tested once on K draws per trained member
(`app.posterior.evaluate_samples`): M * K members at test time, the "test members" column. Its options:

    compare:
      lora_ensemble+swag:
        posterior: {samples: 16, member_chunk_size: 32}     # K (default 4; single_lora+*: 16), members per pass
        training: {posterior: {rank: 10, collect_every_n_steps: 0}}   # over the defaults (0: at epoch ends)

Its trials are scored (SWAG) by the validation NLL of the K-draw ensemble, a pass over M * K members on the
validation split, cheap next to training; (TFB) by the trained members' validation NLL, since sigma is
calibrated on that very split (the draws' validation NLL is the trained one plus at most about
max_nll_increase by construction: no information to rank the settings by).

Rows kept from an earlier compare: a compare into an output folder that holds an earlier compare's
results.json keeps the rows it does not name (their run folders are not touched, only checked to still hold
their test outputs): `--methods lora_ensemble+swag` into a finished comparison's folder trains only that row's
runs, and the tables, the paired bootstrap and the figures hold every row.

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
                               ci95); a failed run adds a row with its error; the paired bootstrap table (every row)
    tuning.db                  the Optuna studies (unless --storage); tuning/<method>/trial<k>/ the trials' folders
    results.json               every run's full results and config, the aggregate, the command
    figures/                   `report.write_figures` of seed 0: all methods on shared axes; reliability_all.png (the
                               reliability diagrams side by side), nll_vs_train_time.png, nll_vs_memory.png
    <method>/seed<i>/          the run folder (see `runner`) + test_outputs.safetensors, compare_run.json, log.txt;
                               a posterior row's also posterior/, evaluation_samples_<K>.json (the K-draw test metrics;
                               results.json keeps the trained members'), compare_posterior.json (its samples, chunks)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import inspect
import io
import json
import math
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
from lora_ensemble.app.tuning import POSTERIOR_BASES
from lora_ensemble.io import atomic_write_bytes
from lora_ensemble.methods import METHODS, accepts_option
from lora_ensemble.methods.lora import CONFIG_FIELDS as LORA_FIELDS
from lora_ensemble.posterior.posterior import POSTERIOR_METHODS

OUTPUTS_FILE = "test_outputs.safetensors"
STATUS_FILE = "compare_run.json"
POSTERIOR_FILE = "compare_posterior.json"  # a posterior row's `posterior_options`, for the run's own process
LOG_FILE = "log.txt"

# posterior rows `<base>+<posterior>` (issue 15): a LoRA method trained with training.posterior, tested on K draws
# per trained member
POSTERIOR_ROWS = tuple(f"{base}+{post}" for base in POSTERIOR_BASES for post in POSTERIOR_METHODS)
ROWS = (*METHODS, *POSTERIOR_ROWS)  # every row name compare takes
DEFAULT_SAMPLES = {"single_lora": 16}  # K per trained member at test time; else 4 (single_lora+swag: 16 members)
ROW_OPTIONS = ("samples", "member_chunk_size")  # compare.<row>.posterior keys

# (column title, key in an aggregate row, format); rows hold (mean, std) tuples over seeds
COLUMNS = [
    ("acc", "acc", ".3f"), ("F1", "f1", ".3f"), ("ECE", "ece", ".3f"), ("NLL", "nll", ".3f"),
    ("Brier", "brier", ".3f"), ("OOD AUROC (entropy)", "ood/auroc_entropy", ".3f"),
    ("OOD AUROC (MI)", "ood/auroc_mi", ".3f"), ("AURC", "sc/aurc", ".3f"),
    ("disagreement", "div/disagreement", ".3f"), ("test members", "test_members", ".0f"),
    ("trainable params", "trainable_parameters", ",.0f"),
    ("params in memory", "total_parameters", ",.0f"), ("train s", "train_time_s", ".1f"),
    ("infer ms/sample", "inference_ms_per_sample", ".2f"), ("peak MB", "peak_memory_mb", ".0f"),
    ("epochs", "epochs_run", ".1f"), ("best epoch", "best_epoch", ".1f"), ("seeds", "seeds", "s"),
]


# ---- configs --------------------------------------------------------------------------------------------
def split_row(name: str) -> tuple[str, str | None]:
    """(method, posterior method or None) of a row name: 'lora_ensemble+swag' -> ('lora_ensemble', 'swag')."""
    base, plus, post = name.partition("+")
    return (base, post) if plus else (name, None)


def check_rows(names: list[str], where: str = "") -> None:
    """ConfigError (one line, listing the valid row names) for any name that is not a row of compare."""
    unknown = [n for n in names if n not in ROWS]
    if not unknown:
        return
    posterior = [n for n in unknown if "+" in n]
    why = ""
    if posterior:
        base, post = split_row(posterior[0])
        why = (f" ({base!r} is not a LoRA method: posterior rows are over {list(POSTERIOR_BASES)})"
               if base not in POSTERIOR_BASES
               else f" (unknown posterior {post!r}; posteriors: {list(POSTERIOR_METHODS)})")
    raise ConfigError(f"{where}unknown method(s) {unknown}{why}; known methods: {sorted(METHODS)}; "
                      f"posterior rows: {list(POSTERIOR_ROWS)}")


def posterior_options(per_method: dict, row: str) -> dict[str, Any]:
    """{'method', 'samples' (K per trained member), 'member_chunk_size' (None: all members in one pass)} of a
    posterior row, from `compare.<row>.posterior`; {} for a plain method."""
    base, post = split_row(row)
    if post is None:
        return {}
    given = dict((per_method.get(row) or {}).get("posterior") or {})
    out = {"method": post, "samples": given.get("samples", DEFAULT_SAMPLES.get(base, 4)),
           "member_chunk_size": given.get("member_chunk_size")}
    for key, low in (("samples", 1), ("member_chunk_size", 1)):
        value = out[key]
        bad = not isinstance(value, int) or isinstance(value, bool) or value < low
        if bad and (value is not None or key == "samples"):  # member_chunk_size None: all members at once
            raise ConfigError(f"compare.{row}.posterior.{key} must be an integer >= {low}, got {value!r}")
    return out


def default_posterior(config: RunConfig, method: str) -> dict[str, Any]:
    """training.posterior of a posterior row when compare.<row>.training.posterior does not set it.

    swag: rank 5; collection from epoch s = budget // 2 (0-based: the last half of the epoch budget), or
    s = min(budget // 2, patience) under early stopping, which runs at least patience + 1 epochs, so epoch s
    always runs and the collection is never empty (budget 4, patience 1: epochs 1-3, i.e. after one warm
    epoch); every n = max(1, steps_per_epoch // 4) optimizer steps (four snapshots an epoch: 8-12 for rank 5
    on the default budget) when `data.train_size` fixes the steps per epoch, else at every epoch end.
    tfb: nothing to set (calibrated on the validation split at the end of training, max_nll_increase 0.003)."""
    if method == "tfb":
        return {"method": "tfb"}
    t = config.training
    start = t.epoch_budget // 2
    if t.early_stopping_patience is not None:
        start = min(start, t.early_stopping_patience)
    every = 0
    train_size = config.data.options.get("train_size")
    if isinstance(train_size, int) and not isinstance(train_size, bool) and train_size > 0:
        batches = math.ceil(train_size / config.data.batch_size)
        steps = math.ceil(batches / t.accumulate_grad_batches)  # optimizer steps per epoch
        every = max(1, steps // 4)
    return {"method": "swag", "rank": 5, "start_epoch": start, "collect_every_n_steps": every}


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
        check_rows([name], where=f"compare.{name}: ")
        if not isinstance(section, dict) or "name" in (section.get("method") or {}):
            raise ConfigError(f"compare.{name}: expected a partial run config (e.g. {{training: {{lr: 1e-4}}}}) "
                              f"that does not change method.name, got {section!r}")
        if "posterior" in section:
            if split_row(name)[1] is None:
                raise ConfigError(f"compare.{name}.posterior: only posterior rows ({list(POSTERIOR_ROWS)}) take it")
            extra = sorted(set(section["posterior"] or {}) - set(ROW_OPTIONS)) if isinstance(
                section["posterior"] or {}, dict) else [section["posterior"]]
            if extra:
                raise ConfigError(f"compare.{name}.posterior: unknown key(s) {extra}; known keys: {list(ROW_OPTIONS)} "
                                  "(the posterior's own settings go in compare.<row>.training.posterior)")
            posterior_options(per_method, name)
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
    values, see `tuning.PARAMETERS`) are set last. A posterior row `<base>+<posterior>` gets `<base>`'s
    config with `compare.<row>` merged on top and `training.posterior` = `default_posterior` updated with
    `compare.<row>.training.posterior`."""
    row, (method, posterior) = method, split_row(method)
    extra = copy.deepcopy(per_method.get(row) or {})
    extra.pop("posterior", None)  # compare's own keys (samples, member_chunk_size), not the run's
    given_posterior = (extra.get("training") or {}).pop("posterior", None)
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
        if posterior is not None:
            raw["training"].pop("posterior", None)
            given = given_posterior or {}
            if not isinstance(given, dict) or given.get("method", posterior) != posterior:
                raise ConfigError(f"training.posterior: the row {row!r} sets method {posterior!r}; "
                                  f"got {given_posterior!r}")
            raw["training"]["posterior"] = {**default_posterior(parse_run_config(copy.deepcopy(raw)), posterior),
                                            **given}
        return parse_run_config(raw), dropped
    except ConfigError as e:
        raise ConfigError(f"{row}: {e}") from None


# ---- one run ----------------------------------------------------------------------------------------------
def _error_line(e: BaseException) -> str:
    """The first line of the error, after its type (a ConfigError's message already names the key)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if isinstance(e, ConfigError) and first else f"{type(e).__name__}: {first}".strip()


def train_one(config: RunConfig, run_dir: str, evaluate_test: bool = True,
              posterior: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into `run_dir`, save its test outputs; never raises: returns {'status': 'ok', 'results'}
    or {'status': 'failed', 'error' (first line), 'traceback'}. `evaluate_test=False` (a tuning trial):
    validation only, the test split is never loaded into a loader.

    `posterior` (a posterior row: `posterior_options`): the test metrics and the saved test outputs are
    those of K = posterior['samples'] draws per trained member (`app.posterior.evaluate_samples`, the
    members `member_chunk_size` at a time), M * K members; the trained members' test metrics stay in
    results['trained_members_metrics'] (and the run's results.json), the sampled ones are also written to
    run_dir/evaluation_samples_K.json. In a SWAG trial the score `best_val_nll` is the validation NLL of the
    K-draw ensemble (its best-epoch trained members' score is kept as `trained_best_val_nll`)."""
    from safetensors.torch import save_file

    from lora_ensemble.app.runner import fit

    try:
        results, run = fit(config, run_dir, overwrite=True, evaluate_test=evaluate_test)
        if not evaluate_test:
            if posterior and posterior["method"] == "swag":
                results = {**results, "trained_best_val_nll": results.get("best_val_nll"),
                           "best_val_nll": _sampled_val_nll(run, run_dir, posterior)}
            return {"status": "ok", "results": results}
        if posterior:
            from lora_ensemble.app.posterior import evaluate_samples

            sampled = evaluate_samples(run, run_dir, posterior["samples"], posterior["member_chunk_size"])
            atomic_write_bytes(os.path.join(run_dir, f"evaluation_samples_{posterior['samples']}.json"),
                               json.dumps(sampled, indent=2).encode())
            results = {**results, **sampled, "trained_members_metrics": results["metrics"],
                       "trained_members_inference_time_per_sample_s": results["inference_time_per_sample_s"]}
        logits, labels, ood = run.module.last_outputs["test"]
        tensors = {"member_logits": logits.contiguous(), "labels": labels.contiguous()}
        if ood is not None:
            tensors["ood_member_logits"] = ood.contiguous()
        save_file(tensors, os.path.join(run_dir, OUTPUTS_FILE))
        return {"status": "ok", "results": results}
    except Exception as e:  # noqa: BLE001 - a failed run is reported in its row, never hidden
        return {"status": "failed", "error": _error_line(e), "traceback": traceback.format_exc()}


def _sampled_val_nll(run: Any, run_dir: str, posterior: dict[str, Any]) -> float:
    """NLL on the validation split of the predictive of K draws per trained member (M * K members, logits /
    the run's temperature): -1/N sum_i log (1/(MK) sum_j softmax(z_ji)[y_i])."""
    from lora_ensemble.app.posterior import load_posterior
    from lora_ensemble.metrics import evaluate

    post = load_posterior(run, run_dir)
    logits, labels = post.member_logits(run.loader("val"), posterior["samples"], seed=run.config.seed,
                                        member_chunk_size=posterior["member_chunk_size"])
    return float(evaluate(logits / run.module.temperature, labels, None, n_bins=run.module.n_bins)["nll"])


def _child_main(run_dir: str, evaluate_test: bool = True) -> int:
    """`python -m lora_ensemble.app.compare --one RUN_DIR [--trial]`: train RUN_DIR/run_config.yaml, write
    compare_run.json (`--trial`: validation only); a posterior row's options are in RUN_DIR/compare_posterior.json."""
    import torch

    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import CONFIG_FILE  # imports Lightning and transformers: part of the baseline

    baseline = _rss_now()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        posterior = None
        if os.path.isfile(os.path.join(run_dir, POSTERIOR_FILE)):
            with open(os.path.join(run_dir, POSTERIOR_FILE), encoding="utf-8") as f:
                posterior = json.load(f)
        status = train_one(load_run_config(os.path.join(run_dir, CONFIG_FILE)), run_dir, evaluate_test, posterior)
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


def run_isolated(config: RunConfig, run_dir: str, evaluate_test: bool = True,
                 posterior: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train in a fresh Python process; its output goes to run_dir/log.txt."""
    from lora_ensemble.app.runner import CONFIG_FILE

    os.makedirs(run_dir, exist_ok=True)
    status_path = os.path.join(run_dir, STATUS_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(status_path)  # never read a previous compare's result
    if posterior:
        atomic_write_bytes(os.path.join(run_dir, POSTERIOR_FILE), json.dumps(posterior).encode())
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run_dir, POSTERIOR_FILE))
    atomic_write_bytes(os.path.join(run_dir, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    src = os.path.dirname(os.path.dirname(os.path.abspath(lora_ensemble.__file__)))  # the folder that holds the package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               TOKENIZERS_PARALLELISM="false")
    with open(os.path.join(run_dir, LOG_FILE), "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "lora_ensemble.app.compare", "--one", run_dir,
                               *([] if evaluate_test else ["--trial"])], check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
    if os.path.isfile(status_path):
        with open(status_path, encoding="utf-8") as f:
            return json.load(f)
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode in (-9, 137):
        why += " (out of memory?)"
    return {"status": "failed", "error": f"the run process ended without a result ({why}); see {run_dir}/{LOG_FILE}"}


def run_in_process(config: RunConfig, run_dir: str, evaluate_test: bool = True,
                   posterior: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train in this process; peak memory only on CUDA (this process's RSS high-water mark is not the run's)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    extra = {"posterior": posterior} if posterior else {}  # a plain method's call is as it always was
    return {**train_one(config, run_dir, evaluate_test, **extra), "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


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
    members = status["results"].get("members") or _test_members(status.get("run_dir"))
    if members is not None:
        row["test_members"] = members
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _test_members(run_dir: str | None) -> int | None:
    """Members of a run's saved test outputs (member_logits (M, N, C): M, read from the file's header)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(run_dir, OUTPUTS_FILE) if run_dir else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            return int(f.get_slice("member_logits").get_shape()[0])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


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
def run_trial(config: RunConfig, run_dir: str, isolate: bool, posterior: dict[str, Any] | None = None) -> dict[str, Any]:
    """One tuning trial: train on the training split, validation only (no test loader is built)."""
    return (run_isolated(config, run_dir, False, posterior) if isolate
            else run_in_process(config, run_dir, False, posterior))


def upgrade_run_config(saved: Any) -> Any:
    """A run config mapping that an earlier version wrote (a run folder's run_config.yaml, a study's
    fingerprint), parsed again so that options added since then hold their defaults: a saved config and
    today's config of the same run compare equal; one that no longer parses is returned as it is."""
    if not isinstance(saved, dict):
        return saved
    try:
        return parse_run_config(copy.deepcopy(saved)).to_dict()
    except ConfigError:
        return saved


def same_run_config(saved: Any, config: RunConfig) -> bool:
    """Whether the saved run config mapping describes `config` (options added since it was written count
    at their defaults, see `upgrade_run_config`)."""
    return upgrade_run_config(saved) == config.to_dict()


def _finished_run(config: RunConfig, run_dir: str, posterior: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The result of an earlier compare's run in run_dir with this very config (and, for a posterior row,
    the same samples and member chunks) (a rerun resumes), else None."""
    from lora_ensemble.app.runner import CONFIG_FILE

    status_path, saved = os.path.join(run_dir, STATUS_FILE), os.path.join(run_dir, CONFIG_FILE)
    if not (os.path.isfile(status_path) and os.path.isfile(saved) and os.path.isfile(os.path.join(run_dir, OUTPUTS_FILE))):
        return None
    try:
        with open(status_path, encoding="utf-8") as f:
            status = json.load(f)
        with open(saved, encoding="utf-8") as f:
            same = same_run_config(yaml.safe_load(f), config)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if posterior:
        res = status.get("results") or {}
        same = same and res.get("samples") == posterior["samples"] \
            and res.get("member_chunk_size") == posterior["member_chunk_size"]
    return status if same and status.get("status") == "ok" else None


def run_compare(config_path: str, methods: list[str] | None = None, seeds: int = 3, output_dir: str = "runs/compare",
                overrides: list[str] | None = None, isolate: bool = True, trials: int | None = None,
                storage: str | None = None, jobs: int = 1) -> dict[str, Any]:
    """Tune (when the config has a `tuning:` section or `trials` > 0), train every (method, seed) of the
    config, write results.md/.csv/.json and figures into `output_dir`; returns what results.json holds.
    `methods=None` means every registered method (posterior rows only when named). A rerun of the same
    command resumes: finished trials and finished final runs (same config) are kept. Rows of an earlier
    compare into the same `output_dir` (its results.json) that this call does not name are kept in the
    tables as they are (their runs not rerun, only checked to be still there: `_earlier_rows`)."""
    from lora_ensemble.app.tuning import default_storage, format_params, parse_tuning, tune_method

    methods = list(methods) if methods else list(METHODS)
    check_rows(methods)
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
    row_posterior = {m: posterior_options(per_method, m) or None for m in methods}
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
    log = lambda text: print(text, flush=True)
    earlier_runs, earlier_configs, earlier_tuning = _earlier_rows(output_dir, methods)
    if earlier_runs:
        summary["earlier_rows"] = list(earlier_runs)
        summary["tuning"].update(earlier_tuning)
        log(f"kept from the earlier compare in {output_dir}: {', '.join(earlier_runs)}")
    configs = {**earlier_configs, **configs}  # earlier rows first in the tables, as they were
    runs: dict[str, list[dict[str, Any] | None]] = {**earlier_runs, **{m: [None] * seeds for m in methods}}
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
                return run_trial(config, os.path.join(output_dir, "tuning", method, f"trial{number}"), isolate,
                                 row_posterior[method])

            fingerprint = {"search space": {k: r.to_dict() for k, r in tuning.space[method].items()},
                           "run config": configs[method][0][0].to_dict()}
            result = tune_method(method, tuning, storage, f"{os.path.basename(os.path.abspath(output_dir))}/{method}",
                                 fingerprint, own_storage, trial, jobs=jobs, log=log,
                                 upgrade={"run config": upgrade_run_config})
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
            status = _finished_run(config, run_dir, row_posterior[method])
            resumed = status is not None
            if status is None:
                status = (run_isolated(config, run_dir, posterior=row_posterior[method]) if isolate
                          else run_in_process(config, run_dir, posterior=row_posterior[method]))
                status["wall_time_s"] = time.perf_counter() - t0
            status.update(run_dir=run_dir, seed=config.seed)  # a run finished before: its folder's status has neither
            runs[method][i] = status
            if status["status"] == "ok":
                res = status["results"]
                m = res["metrics"]
                epochs = f", epochs {res.get('epochs_run')}" + (f" (best {res['best_epoch']})" if res.get("best_epoch") else "")
                members = f", {res['members']} test members" if res.get("members") else ""  # a posterior row
                done = f"test NLL {m['nll']:.4f}, ECE {m['ece']:.3f}, acc {m['acc']:.3f}{epochs}{members}"
            else:
                done = f"FAILED: {status['error']}"
            took = "finished before" if resumed else f"{status['wall_time_s']:.0f} s"
            log(f"[{n}/{total}] {method} seed{i}: {took}, {done}")
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


def _outputs_of(config: RunConfig, run_dir: str | None) -> bool:
    """Whether run_dir holds the test outputs of a run trained with this very config (its run_config.yaml)."""
    from lora_ensemble.app.runner import CONFIG_FILE

    if not run_dir or not os.path.isfile(os.path.join(run_dir, OUTPUTS_FILE)):
        return False
    try:
        with open(os.path.join(run_dir, CONFIG_FILE), encoding="utf-8") as f:
            return same_run_config(yaml.safe_load(f), config)
    except (OSError, yaml.YAMLError):
        return False


def _earlier_rows(output_dir: str, methods: list[str]) -> tuple[dict[str, list], dict[str, list], dict[str, Any]]:
    """(runs, configs, tuning) of the rows of an earlier compare into `output_dir` (its results.json) that
    `methods` does not name, with their recorded results: a finished run is kept when its folder still holds
    its test outputs and its recorded config (`_outputs_of`), a failed run with its recorded error. ({}, {}, {})
    when there is no readable results.json."""
    try:
        with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}, {}, {}
    runs: dict[str, list] = {}
    configs: dict[str, list] = {}
    for row, row_runs in (saved.get("runs") or {}).items():
        if row in methods or row not in ROWS or not isinstance(row_runs, list):
            continue
        kept, kept_configs = [], []
        for r in row_runs:
            try:
                config = parse_run_config(copy.deepcopy(r["config"]))
            except (ConfigError, KeyError, TypeError, ValueError):
                continue
            if r.get("status") == "ok" and not _outputs_of(config, r.get("run_dir")):
                continue  # its folder no longer holds that run's outputs
            kept.append({k: v for k, v in r.items() if k != "config"})
            kept_configs.append((config, []))
        if kept:
            runs[row], configs[row] = kept, kept_configs
    tuning = {row: t for row, t in (saved.get("tuning") or {}).items() if row in runs}
    return runs, configs, tuning


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
