"""TFB posterior members on the trained members of a finished `compare`: no training, paired by construction.

For each seed folder <compare>/lora_ensemble/seed<i>, a copy of the run (model + config) goes to <out>/seed<i>,
`lora-ensemble posterior` finds TFB's sigma on its validation split, and `lora-ensemble evaluate --samples K`
tests K draws per trained member on the same test + OOD split as the compare. Resumable: a finished step (its
JSON exists) is skipped. `--table` prints mean ± 95 % t-interval over seeds of the trained members and of each K,
and the per-seed difference (K draws - trained members).

    python benchmarks/tfb_on_compare.py runs/compare_full runs/tfb --seeds 0 1 2 --samples 1 4 [--samples-seed0 16]
    python benchmarks/tfb_on_compare.py runs/compare_full runs/tfb --table
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

from lora_ensemble.app.stats import seed_interval

METRICS = [("acc", "acc"), ("NLL", "nll"), ("ECE", "ece"), ("Brier", "brier"),
           ("OOD AUROC (entropy)", "ood/auroc_entropy"), ("OOD AUROC (MI)", "ood/auroc_mi"),
           ("disagreement", "div/disagreement")]
CLI = [sys.executable, "-m", "lora_ensemble.app.cli"]


def run_seed(compare: str, out: str, seed: int, samples: list[int]) -> None:
    src, dst = os.path.join(compare, "lora_ensemble", f"seed{seed}"), os.path.join(out, f"seed{seed}")
    if not os.path.isdir(os.path.join(dst, "posterior")):
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        shutil.copytree(os.path.join(src, "model"), os.path.join(dst, "model"))
        for name in ("run_config.yaml", "run_info.json", "results.json"):
            shutil.copy(os.path.join(src, name), dst)
        subprocess.run([*CLI, "posterior", "--checkpoint", dst], check=True)
    for k in samples:
        if not os.path.isfile(os.path.join(dst, f"evaluation_samples_{k}.json")):
            subprocess.run([*CLI, "evaluate", "--checkpoint", dst, "--samples", str(k)], check=True)


def _cell(values: list[float]) -> str:
    mean, half = seed_interval(values)
    return f"{mean:.3f}" if half is None else f"{mean:.3f} ± {half:.3f}"


def table(out: str) -> str:
    rows: dict[str, list[dict]] = {}
    for seed_dir in sorted(glob.glob(os.path.join(out, "seed*"))):
        with open(os.path.join(seed_dir, "results.json"), encoding="utf-8") as f:
            trained = json.load(f)["metrics"]
        rows.setdefault("lora_ensemble (trained, 4)", []).append(trained)
        for path in sorted(glob.glob(os.path.join(seed_dir, "evaluation_samples_*.json")),
                           key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0])):
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
            metrics = dict(res["metrics"], _trained=trained)
            rows.setdefault(f"+ tfb, 4 x {res['samples']}", []).append(metrics)
    lines = ["| row | seeds | " + " | ".join(t for t, _ in METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, ms in rows.items():
        lines.append(f"| {name} | {len(ms)} | " + " | ".join(_cell([m[k] for m in ms]) for _, k in METRICS) + " |")
    lines += ["", "Per-seed difference, K draws - the trained members (mean ± 95 % t-interval over seeds):", "",
              "| row | seeds | " + " | ".join(t for t, _ in METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, ms in rows.items():
        if "_trained" in ms[0]:
            lines.append(f"| {name} | {len(ms)} | " + " | ".join(
                _cell([m[k] - m["_trained"][k] for m in ms]) for _, k in METRICS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compare")
    p.add_argument("out")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--samples", type=int, nargs="*", default=[1, 4])
    p.add_argument("--samples-seed0", type=int, nargs="*", default=[], help="extra K for seed 0 only")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        print(table(args.out))
        return
    for seed in args.seeds:
        run_seed(args.compare, args.out, seed, args.samples + (args.samples_seed0 if seed == 0 else []))


if __name__ == "__main__":
    main()
