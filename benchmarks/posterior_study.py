"""Posterior members on the offline default (issue 15): do 4 trained members x K posterior draws reach 16 trained
members? The study of docs/posterior.md, resumable.

Per seed, five runs on configs/bbc_news_minilm.yaml (gain 1, lr 5e-3, pinned) with the sizes below (SIZE: smaller
splits and inputs than the config, for a 2-core machine):

    ens4        lora_ensemble, M = 4, training.posterior swag on the run's own cosine schedule (SWAG below)
    ens4_swa    the same with swa_lr: the learning rate held constant through the collection (SWA below)
    ens16       lora_ensemble, M = 16
    single      single_lora (M = 1), as ens4 (the SWAG-LoRA baseline: the same code with M = 1)
    single_swa  single_lora, as ens4_swa

and these evaluations on the test split (+ the OOD split for OOD AUROC), each one cell:

    lora_ensemble-4 / -16  ens4's / ens16's trained members          lora_ensemble-4-swa  ens4_swa's trained members
    swag-K, swa-K          ens4 / ens4_swa + K SWAG draws per member (4 K members) for K in SAMPLES
    tfb-K                  ens4 + K TFB draws per member: sigma calibrated on the validation split (anchor set,
                           max_nll_increase 0.003, LoraPosterior.calibrate), for K in SAMPLES
    single_swag-16, single_swa-16   single / single_swa + 16 SWAG draws

The goal's cells (16 trained members against 4 x 16 draws) run first on every seed, then the rest. Seed 0's first
cells ran at the default before commit 4d984c6 (gain 10, lr 2e-3) with three variants (SWAG scale 0 and 0.5, TFB at
a 10x threshold); they are kept in docs/posterior/cells_gain10_lr2e-3/ (`--table --old`).

    nohup nice -n 5 python benchmarks/posterior_study.py > runs/posterior/study.log 2>&1 &   # what is not done
    python benchmarks/posterior_study.py --table       # markdown table (mean ± 95 % t-interval over the seeds)
    python benchmarks/posterior_study.py --figure      # docs/posterior/members.png

A finished cell is docs/posterior/cells/<seed>-<cell>.json (metrics, times, the posterior's settings); it is
skipped (delete it to rerun). Run folders go to runs/posterior/seed<seed>/<run>/ (not committed); a run with a
results.json there is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "lora_ensemble" / "configs" / "bbc_news_minilm.yaml"
OUT = ROOT / "docs" / "posterior"
RUNS = ROOT / "runs" / "posterior"

# the offline default's schedule (3 epochs, lr 2e-3, warm-up 10, batch 16) on less data and shorter inputs:
# 240 training articles (15 steps an epoch, 45 in all), 32 tokens, 100 / 200 / 100 val / test / OOD articles
SIZE = ["model.max_length=32", "data.train_size=240", "data.val_size=100", "data.test_size=200", "data.ood_size=100",
        "training.val_every_n_epochs=3", "training.progress_bar=false",
        # pinned at the offline default since commit 4d984c6 (gain 1, lr 5e-3): seed 0's first cells ran at the
        # default before it (gain 10, lr 2e-3) and are kept apart (the gain10 study)
        "method.init_gain=1.0", "training.lr=5e-3"]
# SWAG: collected every 3 optimizer steps from the second epoch on (steps 18, 21, ..., 45: 10 snapshots), the last
# 5 deviations kept
SWAG = "training.posterior={method: swag, rank: 5, start_epoch: 1, collect_every_n_steps: 3}"
# SWA's schedule for the collection (training.posterior.swa_lr): the same snapshots, but from the second epoch on the
# learning rate is held at half the peak instead of following the cosine decay, so the snapshots scatter around a
# stationary point (SWAG's assumption) instead of trailing a still-improving trajectory
SWA = "training.posterior={method: swag, rank: 5, start_epoch: 1, collect_every_n_steps: 3, swa_lr: 2.5e-3}"
# SWAG on the adapters alone (include_heads: false): the same snapshots of A and B, every draw keeps the trained heads
# (the SWA mean of the heads is where SWAG's NLL goes: benchmarks/swa_mean_gap.py)
SWAG_ADAPTERS = "training.posterior={method: swag, rank: 5, start_epoch: 1, collect_every_n_steps: 3, include_heads: false}"
RUN_SETS = {
    "ens4": ["method.num_members=4", SWAG],
    "ens16": ["method.num_members=16"],
    "single": ["method.name=single_lora", SWAG],
    "ens4_swa": ["method.num_members=4", SWA],
    "single_swa": ["method.name=single_lora", SWA],
    "ens4_adapters": ["method.num_members=4", SWAG_ADAPTERS],
}
TRAINED = {"ens4": 4, "ens16": 16, "single": 1, "ens4_swa": 4, "single_swa": 1, "ens4_adapters": 4}
# SWAG on the adapters alone, 4 trained members x K draws: measured after the rest, K = 16 first
ADAPTER_CELLS = [(f"swag_adapters-{k}", "ens4_adapters", k, "swag", 1.0, 0.003) for k in (16, 4, 1)]
SAMPLES = (1, 4, 16)
TFB_EPS = 0.003
EVAL_SAMPLED = ["data.eval_batch_size=16"]  # 64 members x 16 rows per forward pass
KEYS = ("acc", "nll", "ece", "brier", "ood/auroc_entropy", "ood/auroc_mi")


def cells(seed: int = 0) -> list[tuple[str, str, int | None, str | None, float, float]]:
    """(cell, run, K, posterior, scale, TFB threshold) of the default study: the goal's cells first, then the rest."""
    out = [("lora_ensemble-4", "ens4", None, None, 1.0, TFB_EPS), ("lora_ensemble-16", "ens16", None, None, 1.0, TFB_EPS)]
    out += [(f"{name}-16", run, 16, kind, 1.0, TFB_EPS) for name, run, kind in GOAL]
    out += [("lora_ensemble-4-swa", "ens4_swa", None, None, 1.0, TFB_EPS)]
    out += [(f"{name}-4", run, 4, kind, 1.0, TFB_EPS) for name, run, kind in GOAL[:3]]
    out += [("single_swag-16", "single", 16, "swag", 1.0, TFB_EPS)]
    out += [(f"{name}-1", run, 1, kind, 1.0, TFB_EPS) for name, run, kind in GOAL[:3]]
    out += [("swa-1-scale0", "ens4_swa", 1, "swag", 0.0, TFB_EPS)]  # the SWA means alone: where SWAG's NLL goes
    return out + ADAPTER_CELLS


def issue_cells() -> list[tuple[str, str, int | None, str | None, float, float]]:
    """The issue's rows alone (no swa_lr runs), the goal's cells first; plus SWAG's means alone (scale 0)."""
    out = [("lora_ensemble-4", "ens4", None, None, 1.0, TFB_EPS), ("lora_ensemble-16", "ens16", None, None, 1.0, TFB_EPS)]
    out += [(f"{name}-16", "ens4", 16, name, 1.0, TFB_EPS) for name in ("tfb", "swag")]
    out += [("swag-1-scale0", "ens4", 1, "swag", 0.0, TFB_EPS), ("single_swag-16", "single", 16, "swag", 1.0, TFB_EPS)]
    out += [(f"{name}-{k}", "ens4", k, name, 1.0, TFB_EPS) for k in (4, 1) for name in ("tfb", "swag")]
    return out + ADAPTER_CELLS


def goal_cells() -> list[tuple[str, str, int | None, str | None, float, float]]:
    """The goal's cells, SWAG's means alone and adapters-only SWAG at K = 16: what the gain-10 setting (where 16
    members beat 4) is run for."""
    return issue_cells()[:5] + ADAPTER_CELLS[:1]


# (cell name, run, posterior) of the rows the goal compares with 16 trained members, at K = 16 first
GOAL = [("swa", "ens4_swa", "swag"), ("tfb", "ens4", "tfb"), ("swag", "ens4", "swag"), ("single_swa", "single_swa", "swag")]


@dataclass(frozen=True)
class Study:
    """One setting of the study: overrides on top of SIZE, where its cells and runs go, which cells it measures."""
    overrides: tuple[str, ...]
    cells: Path
    runs: Path
    cell_list: Callable[[], list[tuple[str, str, int | None, str | None, float, float]]]
    title: str


STUDIES = {
    "default": Study((), OUT / "cells", RUNS, cells, "BBC News / MiniLM"),
    # seed 0's first cells ran at the offline default before commit 4d984c6 (gain 10, lr 2e-3), with three variants
    # (SWAG scale 0 and 0.5, TFB at a 10x threshold); seeds 1 and 2 pin that default: 16 trained members beat 4 there
    "gain10": Study(("method.init_gain=10.0", "training.lr=2e-3"), OUT / "cells_gain10_lr2e-3", RUNS / "gain10",
                    goal_cells, "BBC News / MiniLM, gain 10, lr 2e-3"),
    # the comparison's second offline dataset (docs/results.md): negative vs positive tweets, neutral ones as OOD
    "tweets": Study(("data.name=tweet_sentiment", "data.ood_class=neutral"), OUT / "cells_tweets", RUNS / "tweets",
                    issue_cells, "tweet sentiment / MiniLM"),
}


def run_dir(study: Study, seed: int, name: str) -> Path:
    return study.runs / f"seed{seed}" / name


def overrides(study: Study, seed: int, run: str) -> list[str]:
    return [*SIZE, *study.overrides, f"seed={seed}", *RUN_SETS[run]]


def train(study: Study, seed: int, name: str) -> dict[str, Any]:
    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import fit

    folder = run_dir(study, seed, name)
    done = folder / "results.json"
    if not done.is_file():
        config = load_run_config(CONFIG, overrides(study, seed, name))
        print(f"[{time.strftime('%H:%M:%S')}] fit seed {seed} {name}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            fit(config, str(folder), overwrite=True)
    return json.loads(done.read_text())


def evaluate_cell(study: Study, seed: int, cell: str, run: str, k: int | None, posterior: str | None, scale: float = 1.0,
                  eps: float = TFB_EPS) -> dict[str, Any]:
    from lora_ensemble import LoraPosterior
    from lora_ensemble.app.posterior import use_posterior_samples
    from lora_ensemble.app.runner import load_run, make_trainer, test

    trained = train(study, seed, run)
    folder = run_dir(study, seed, run)
    loaded = load_run(str(folder), EVAL_SAMPLED if k else [])
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if posterior == "swag":
        extra = use_posterior_samples(loaded, str(folder), k, scale=scale)
    elif posterior == "tfb":
        post = LoraPosterior(loaded.module.method, method="tfb")
        tfb_folder = folder / ("posterior_tfb" if eps == TFB_EPS else f"posterior_tfb_eps{eps:g}")
        if (tfb_folder / "posterior_config.json").is_file():
            post = LoraPosterior.from_pretrained(loaded.module.method, tfb_folder)
        else:
            post.calibrate(loaded.loader("val"), max_nll_increase=eps)
            post.save_pretrained(tfb_folder)
        loaded.module.method = post.sample(k, seed=seed, scale=scale)
        extra = {"posterior": "tfb", "samples": k, "members": post.num_members * k, "scale": scale,
                 "tfb": post.calibration.to_dict()}
    prepare_s = time.perf_counter() - start
    with contextlib.redirect_stdout(io.StringIO()):
        results = test(loaded, make_trainer(loaded.config, None))
    metrics = results["metrics"]
    return {
        "seed": seed, "cell": cell, "run": run, "samples": k, "posterior": posterior,
        "trained_members": TRAINED[run],
        "test_members": int(loaded.module.method.num_members),
        **{key: metrics[key] for key in KEYS if key in metrics},
        "train_time_s": trained["train_time_s"],
        "inference_time_per_sample_s": results["inference_time_per_sample_s"],
        "posterior_prepare_s": prepare_s,
        **{key if key.startswith("posterior_") else f"posterior_{key}": v for key, v in extra.items()
           if key not in ("samples", "posterior")},
        "overrides": overrides(study, seed, run), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
    }


def measure(study: Study, seeds: list[int]) -> None:
    study.cells.mkdir(parents=True, exist_ok=True)
    # cell by cell over the seeds: a short budget gets the goal's cells on every seed before anything else
    for cell, run, k, posterior, scale, eps in study.cell_list():
        for seed in seeds:
            path = study.cells / f"{seed}-{cell}.json"
            if path.is_file():
                continue
            t0 = time.perf_counter()
            row = evaluate_cell(study, seed, cell, run, k, posterior, scale, eps)
            from lora_ensemble.io import atomic_write_bytes

            atomic_write_bytes(path, json.dumps(row, indent=2).encode())
            print(f"[{time.strftime('%H:%M:%S')}] {study.cells.name} seed {seed} {cell}: nll {row['nll']:.4f} acc {row['acc']:.4f} "
                  f"auroc_mi {row.get('ood/auroc_mi', float('nan')):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)


def measured(folder: Path) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        row = json.loads(path.read_text())
        rows.setdefault(row["cell"], []).append(row)
    return rows


def fmt(values: list[float], digits: int = 4) -> str:
    """The mean ± half-width of the 95 % t-interval over seeds (one value: the value)."""
    from lora_ensemble.app.stats import format_interval

    return format_interval(values, digits)


def table(study: Study) -> str:
    rows = measured(study.cells)
    head = ("| cell | trained | at test | seeds | acc | NLL | ECE | Brier | OOD AUROC (entropy) | OOD AUROC (MI) "
            "| train s | inference ms/sample |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for cell in dict.fromkeys([c[0] for c in study.cell_list()] + sorted(rows)):
        got = rows.get(cell, [])
        if not got:
            continue
        col = lambda key, got=got: [r[key] for r in got if key in r]
        lines.append(f"| {cell} | {got[0]['trained_members']} | {got[0]['test_members']} | "
                     f"{','.join(str(r['seed']) for r in got)} | {fmt(col('acc'))} | {fmt(col('nll'))} | "
                     f"{fmt(col('ece'))} | {fmt(col('brier'))} | {fmt(col('ood/auroc_entropy'))} | "
                     f"{fmt(col('ood/auroc_mi'))} | {fmt(col('train_time_s'), 1)} | "
                     f"{fmt([1000 * v for v in col('inference_time_per_sample_s')], 2)} |")
    return "\n".join(lines)


def goal_table(study: Study, reference: str = "lora_ensemble-16") -> str:
    """Per seed, (row - reference) for NLL and OOD AUROC, and the row's training time over the reference's (its
    run's train_time_s / the reference run's), as mean ± 95 % t-interval over the seeds that have both. The
    reference lora_ensemble-16 is the goal; lora_ensemble-4 (the members the draws come from) shows what the
    draws add."""
    from lora_ensemble.app.stats import format_interval

    rows = measured(study.cells)
    ref = {r["seed"]: r for r in rows.get(reference, [])}
    label = {"lora_ensemble-16": "16 trained members", "lora_ensemble-4": "the 4 trained members"}[reference]
    keys = [("nll", "NLL"), ("ood/auroc_entropy", "OOD AUROC (entropy)"), ("ood/auroc_mi", "OOD AUROC (MI)")]
    lines = [f"| row - {label} | seeds | " + " | ".join(f"Δ {name}" for _, name in keys)
             + " | training time / reference's |", "|---|---|" + "---|" * (len(keys) + 1)]
    goal = ["lora_ensemble-4", "lora_ensemble-16", *(f"{name}-16" for name, _, _ in GOAL), "swag_adapters-16",
            "single_swag-16"]
    for cell in [c for c in goal if c in rows and c != reference]:
        got = [r for r in rows.get(cell, []) if r["seed"] in ref]
        if not got:
            continue
        cells = [format_interval([r[key] - ref[r["seed"]][key] for r in got], signed=True) for key, _ in keys]
        cells.append(format_interval([r["train_time_s"] / ref[r["seed"]]["train_time_s"] for r in got], 2))
        lines.append(f"| {cell} | {','.join(str(r['seed']) for r in got)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(study: Study) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measured(study.cells)
    kinds = {"lora_ensemble (trained)": ["lora_ensemble-4", "lora_ensemble-16"],
             "lora_ensemble + swag": [f"swag-{k}" for k in SAMPLES],
             "lora_ensemble + swag (swa_lr)": [f"swa-{k}" for k in SAMPLES],
             "lora_ensemble + swag (adapters only)": [f"swag_adapters-{k}" for k in SAMPLES],
             "lora_ensemble + tfb": [f"tfb-{k}" for k in SAMPLES], "single_lora + swag": ["single_swag-16"],
             "single_lora + swag (swa_lr)": ["single_swa-16"]}
    names = [n for group in kinds.values() for n in group if n in rows]
    seeds = sorted({r["seed"] for n in names for r in rows.get(n, [])})
    complete = [sd for sd in seeds if all(any(r["seed"] == sd for r in rows.get(n, [])) for n in names)]
    rows = {n: [r for r in rows.get(n, []) if r["seed"] in complete] for n in names}  # seeds with every cell
    rows = {n: got for n, got in rows.items() if got}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig.suptitle(f"posterior members, {study.title} (mean over seeds {complete})", fontsize=10)
    for ax, key, label in ((axes[0], "nll", "test NLL"), (axes[1], "ood/auroc_mi", "OOD AUROC (MI)")):
        for kind, names in kinds.items():
            pts = [(rows[n][0]["test_members"], statistics.mean(r[key] for r in rows[n])) for n in names if n in rows]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("members at test time")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = OUT / ("members.png" if study is STUDIES["default"] else f"members_{study.cells.name.removeprefix('cells_')}.png")
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--study", choices=sorted(STUDIES), default="default",
                   help="the setting: default (the offline default at gain 1, lr 5e-3), gain10 (gain 10, lr 2e-3), "
                        "tweets (tweet sentiment)")
    p.add_argument("--table", action="store_true", help="print the table of the measured cells")
    p.add_argument("--figure", action="store_true", help="write the figure docs/posterior/members*.png")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    if args.table:
        print(table(study) + "\n\n" + goal_table(study) + "\n\n" + goal_table(study, "lora_ensemble-4"))
        return 0
    if args.figure:
        print(figure(study))
        return 0
    measure(study, args.seeds)
    print(table(study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
