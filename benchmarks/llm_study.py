"""LoRA-Ensemble on SmolLM2-135M (BBC News, letters protocol): the study of docs/llm.md (issue 17).

Every run is the committed config configs/smollm2_bbc_news.yaml (verbalizer head, LoRA on q/v of the last 2
layers with a shared trunk, 200 training articles, 64-token prompts, 'entertainment' as OOD):

    zero_shot            the instruct model's letter probabilities as they come: no training (single_lora with its
                         LoRA B = 0, so the outputs are exactly the frozen model's), test + OOD only
    single_lora-seed<s>  one LoRA adapter (M = 1)                 lora-ensemble fit, method.name=single_lora
    lora_ensemble-seed<s> LoRA-Ensemble, M = 4                    lora-ensemble fit (the config as committed)

MC dropout is not run: SmolLM2 (Llama) has no dropout module and attention_dropout 0.0 (the mc_dropout method
refuses such a backbone). Each run is its own process (`nice -n 5` is up to the caller); its peak resident memory
(ru_maxrss of the child) and wall time are added to its results. Resumable: a run whose JSON exists is skipped,
an interrupted fit continues from its checkpoint (--resume).

    nohup nice -n 5 .venv/bin/python benchmarks/llm_study.py --seeds 0 1 2 > runs/llm_study.log 2>&1 &
    .venv/bin/python benchmarks/llm_study.py --tag e10-lr2e-3 --seeds 0 --set training.epochs=10 \
        training.lr=2e-3 training.val_every_n_epochs=10      # a variant: runs named e10-lr2e-3-<run>
    .venv/bin/python benchmarks/llm_study.py --tag e10-lr2e-3 --seeds 2 --tfb-samples 4 ...  # + TFB draws, 4 per member
    .venv/bin/python benchmarks/llm_study.py --config configs/smollm2_bbc_news_mc.yaml --tag mc --seeds 0 \
        --set training.epochs=10 training.lr=2e-3 training.val_every_n_epochs=10   # multiple choice, with zero-shot
    .venv/bin/python benchmarks/llm_study.py --table         # the markdown table of what is measured

Results: docs/llm/<run>.json (raw results.json of the run + peak_rss_bytes, wall_s, command); run folders in
runs/llm_study/<run>/ (with --out elsewhere, e.g. a smoke run with --set data.train_size=8 ...: <out>/runs/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_bbc_news.yaml"
OUT = ROOT / "docs" / "llm"
RUNS = ROOT / "runs" / "llm_study"
METRICS = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"), ("ood/auroc_msp", "OOD AUROC (MSP)"),
           ("ood/auroc_entropy", "OOD AUROC (entropy)"), ("ood/auroc_mi", "OOD AUROC (MI)")]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_child(command: list[str], log: Path) -> tuple[int, int, float]:
    """(return code, peak RSS in bytes, wall seconds) of `command` run as a child process."""
    start = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux: ru_maxrss in KiB


def zero_shot_child(out: Path, extra: list[str]) -> None:
    """Test + OOD metrics of the untrained single_lora verbalizer (= the frozen instruct model)."""
    import torch

    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import build_run, make_trainer, test

    config = load_run_config(CONFIG, ["method.name=single_lora", "training.progress_bar=false", *extra])
    run = build_run(config)
    assert all(torch.count_nonzero(p) == 0 for n, p in run.module.method.member_parameters().items()
               if "lora_B" in n), "a zero-shot run needs LoRA B = 0"
    results = test(run, make_trainer(config, None))
    from lora_ensemble.app.diagnostics import collapse_warning

    logits, labels, _ = run.module.last_outputs["test"]
    results["prediction_collapse"] = collapse_warning(logits, labels, run.splits.class_names, warn=False)
    predicted = logits.float().softmax(-1).mean(0).argmax(-1)
    results["predicted_class_counts"] = {c: int((predicted == i).sum()) for i, c in enumerate(run.splits.class_names)}
    results["config_overrides"] = ["method.name=single_lora"]
    out.write_text(json.dumps(results, indent=2))


def jobs(seeds: list[int], tag: str | None = None, zero_shot: bool = True) -> list[tuple[str, list[str]]]:
    """The runs: zero-shot (if `zero_shot`), then single LoRA and LoRA-Ensemble per seed; names get `<tag>-` in
    front."""
    prefix = f"{tag}-" if tag else ""
    out = [(f"{prefix}zero_shot", [])] if zero_shot else []
    for s in seeds:
        out += [(f"{prefix}single_lora-seed{s}", [f"seed={s}", "method.name=single_lora"]),
                (f"{prefix}lora_ensemble-seed{s}", [f"seed={s}"])]
    return out


def run_job(name: str, overrides: list[str], extra: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    target, log = OUT / f"{name}.json", RUNS / f"{name}.log"
    if target.is_file():
        print(f"{name}: measured ({target.relative_to(ROOT)})", flush=True)
        return
    print(f"{name}: running ({time.strftime('%H:%M:%S')})", flush=True)
    if name.endswith("zero_shot"):
        raw = RUNS / f"{name}.results.json"
        command = [sys.executable, __file__, "--config", str(CONFIG), "--zero-shot-child", str(raw),
                   *(["--set", *extra] if extra else [])]
    else:
        run_dir = RUNS / name
        raw = run_dir / "results.json"
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        command = [sys.executable, "-m", "lora_ensemble.app.cli", "fit", "--config", str(CONFIG), "--output-dir",
                   str(run_dir), "--resume" if resume else "--overwrite", "--set", *overrides,
                   "training.progress_bar=false", *extra]
    results = measured_child(name, command, log, raw)
    if results is None:
        return
    from lora_ensemble.app.run_config import load_run_config

    config = load_run_config(CONFIG, extra)
    if not name.endswith("zero_shot"):  # the resolved config the run trained with (its run folder's run_config.yaml)
        import yaml

        results["run_config"] = yaml.safe_load((RUNS / name / "run_config.yaml").read_text())
    results["steps_per_epoch"] = math.ceil(config.data.options["train_size"] / config.data.batch_size)
    write_result(name, target, results)


def measured_child(name: str, command: list[str], log: Path, raw: Path, what: str = "") -> dict | None:
    """Run `command` (run_child), then its JSON `raw` with the peak RSS, wall time, command, date and machine
    added; None (and a line saying so) when it failed."""
    code, peak, wall = run_child(command, log)
    if code != 0:
        print(f"{name}: {what}failed with exit code {code}; see {log}", flush=True)
        return None
    results = json.loads(raw.read_text())
    shown = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in command]
    results.update(peak_rss_bytes=peak, wall_s=wall, command=" ".join(["python", *shown[1:]]),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=machine())
    return results


def write_result(name: str, target: Path, results: dict) -> None:
    from lora_ensemble.io import atomic_write_bytes

    atomic_write_bytes(target, (json.dumps(results, indent=2) + "\n").encode())
    print(f"{name}: done in {results['wall_s']:.0f} s, peak RSS {results['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)


def run_tfb(run_name: str, k: int) -> None:
    """TFB draws on a trained LoRA-Ensemble run: `lora-ensemble posterior` (sigma on the run's validation split,
    once per run) then `evaluate --samples K`; the result is docs/llm/<run>+tfb-<K>.json."""
    name = f"{run_name}+tfb-{k}"
    target, run_dir, log = OUT / f"{name}.json", RUNS / run_name, RUNS / f"{name}.log"
    if target.is_file():
        print(f"{name}: measured ({target.relative_to(ROOT)})", flush=True)
        return
    if not (run_dir / "results.json").is_file():
        print(f"{name}: skipped, {run_name} is not trained in {run_dir}", flush=True)
        return
    cli = [sys.executable, "-m", "lora_ensemble.app.cli"]
    config_path = run_dir / "posterior" / "posterior_config.json"
    calibrate_s = None
    if not config_path.is_file():
        print(f"{name}: calibrating sigma ({time.strftime('%H:%M:%S')})", flush=True)
        code, _, calibrate_s = run_child([*cli, "posterior", "--checkpoint", str(run_dir)], log)
        if code != 0:
            print(f"{name}: posterior failed with exit code {code}; see {log}", flush=True)
            return
    print(f"{name}: evaluating {k} draws per member ({time.strftime('%H:%M:%S')})", flush=True)
    raw = run_dir / f"evaluation_samples_{k}.json"
    command = [*cli, "evaluate", "--checkpoint", str(run_dir), "--samples", str(k), "--output", str(raw)]
    results = measured_child(name, command, log, raw, what="evaluate ")
    if results is None:
        return
    results.update(posterior_config=json.loads(config_path.read_text()), calibrate_wall_s=calibrate_s)
    write_result(name, target, results)


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} " \
           f"({torch.get_num_threads()} threads), no GPU"


def table() -> str:
    rows = ["| run | " + " | ".join(label for _, label in METRICS)
            + " | s / train step (epoch 1, epochs 2+) | s / test sample | peak RSS MiB |",
            "|---|" + "---|" * (len(METRICS) + 3)]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        m = r["metrics"]
        cells = [f"{m[k]:.3f}" if k in m else "-" for k, _ in METRICS]
        epochs = r.get("train_epoch_times_s") or []
        steps = r.get("steps_per_epoch")
        if epochs and steps:
            later = sum(epochs[1:]) / max(1, len(epochs) - 1) / steps if len(epochs) > 1 else float("nan")
            step = f"{epochs[0] / steps:.2f}, {later:.2f}"
        else:
            step = "-"
        cells += [step, f"{r['inference_time_per_sample_s']:.3f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"]
        rows.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def seed_summary() -> str:
    """Runs that differ only in their seed (`<name>-seed<s>[+tfb-K]`), as mean ± half-width of the 95 % t-interval
    over the seeds measured."""
    import re

    from lora_ensemble.app.stats import format_interval

    groups: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob("*.json")):
        match = re.fullmatch(r"(.*)-seed(\d+)(.*)", path.stem)
        if match:
            groups.setdefault(match.group(1) + match.group(3), []).append(json.loads(path.read_text()))
    rows = ["| runs | seeds | " + " | ".join(label for _, label in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, results in groups.items():
        cells = [format_interval([r["metrics"][key] for r in results if key in r["metrics"]], 3) for key, _ in METRICS]
        rows.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    global CONFIG, OUT, RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--table", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run (a smoke test)")
    p.add_argument("--tag", help="name of a variant whose settings --set changes (prefixes its run names)")
    p.add_argument("--out", default=str(OUT), help="folder of the result JSONs (default docs/llm)")
    p.add_argument("--tfb-samples", type=int, nargs="*", default=[], metavar="K",
                   help="after the runs: TFB draws (K per member) on each trained LoRA-Ensemble run of --seeds")
    p.add_argument("--config", default=str(CONFIG), help="the run config of every run (default "
                   "configs/smollm2_bbc_news.yaml); another config runs zero-shot too, under --tag")
    p.add_argument("--zero-shot-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    CONFIG = Path(args.config).resolve()
    other_config = CONFIG != (ROOT / "configs" / "smollm2_bbc_news.yaml").resolve()  # configs/ may be a link
    if other_config and not args.tag and not args.zero_shot_child and not args.table:
        p.error("--config: name the variant with --tag (its runs are named <tag>-<run>)")
    if args.zero_shot_child:
        return zero_shot_child(Path(args.zero_shot_child), args.set)
    OUT = Path(args.out).resolve()
    if OUT != ROOT / "docs" / "llm":  # a smoke run keeps its run folders beside its JSONs
        RUNS = OUT / "runs"
    if args.table:
        return print(table() + "\n\n" + seed_summary())
    # zero-shot trains nothing, so a tag (training settings) skips it, unless the config (the protocol) is another
    for name, overrides in jobs(args.seeds, args.tag, zero_shot=not args.tag or other_config):
        run_job(name, overrides, args.set)
    prefix = f"{args.tag}-" if args.tag else ""
    for s in args.seeds:
        for k in args.tfb_samples:
            run_tfb(f"{prefix}lora_ensemble-seed{s}", k)


if __name__ == "__main__":
    main()
