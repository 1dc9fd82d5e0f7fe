"""Cached trunk: training time with and without `training.cache_trunk`, for adapters in the last k blocks.

Default (steps): MiniLM-L6 as in the offline default (B = 16, T = 64, M = 4, r = 8, Q/K/V/O, share_trunk), one
training step (forward + backward + AdamW) with the trunk computed vs replayed from a filled `TrunkCache`, timed
round by round in one process (median of --repeats), so machine load falls on both alike.

--fit: whole runs of `lora-ensemble fit` on configs/bbc_news_minilm.yaml (3 epochs), once without and once with
the cache, for every k: per-epoch times (epoch 1 fills the cache, later epochs replay it) and a check that both
runs end with the same test metrics (the cache changes no number, only time). Sequential runs: noisier.

    python benchmarks/bench_cached_trunk.py [--ks 1,2,3] [--repeats 20] [--fit] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("acc", "ece", "nll", "brier", "ood/auroc_entropy")


def main() -> None:
    from lora_ensemble.app.run_config import load_run_config
    from lora_ensemble.app.runner import fit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "bbc_news_minilm.yaml"))
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--output", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--fit", action="store_true", help="whole fit runs instead of interleaved steps")
    args = p.parse_args()
    if not args.fit:
        return steps(args)
    rows = []
    for k in (int(k) for k in args.ks.split(",")):
        layers = "[" + ",".join(str(i) for i in range(-k, 0)) + "]"
        row: dict = {"k": k}
        for cache in (False, True):
            overrides = [f"method.layers={layers}", "method.share_trunk=true", f"training.cache_trunk={str(cache).lower()}",
                         "training.progress_bar=false"]
            with tempfile.TemporaryDirectory() as run_dir:
                results, _ = fit(load_run_config(args.config, overrides), run_dir)
            name = "cached" if cache else "plain"
            row[name] = {"epoch_times_s": results["train_epoch_times_s"], "train_time_s": results["train_time_s"],
                         "metrics": {m: float(results["metrics"][m]) for m in METRICS}, "trunk_cache": results.get("trunk_cache")}
        same = all(abs(row["plain"]["metrics"][m] - row["cached"]["metrics"][m]) <= 1e-4 for m in METRICS)
        row["same_metrics"] = same
        rows.append(row)
    print("| k | plain epoch s (1, 2, 3) | cached epoch s (1, 2, 3) | later epochs speed-up | run speed-up | "
          "cache MB | same metrics |")
    print("|---:|---|---|---:|---:|---:|---|")
    for row in rows:
        pe, ce = row["plain"]["epoch_times_s"], row["cached"]["epoch_times_s"]
        later = sum(pe[1:]) / max(1e-9, sum(ce[1:]))
        run = sum(pe) / sum(ce)
        mb = row["cached"]["trunk_cache"]["bytes"] / 2**20
        print(f"| {row['k']} | {', '.join(f'{t:.1f}' for t in pe)} | {', '.join(f'{t:.1f}' for t in ce)} | "
              f"{later:.2f}x | {run:.2f}x | {mb:.1f} | {'yes' if row['same_metrics'] else 'NO'} |")
    for row in rows:
        print(f"k={row['k']}: " + ", ".join(f"{m} {row['cached']['metrics'][m]:.4f}" for m in METRICS))
    if args.output:
        import torch

        with open(args.output, "w") as f:
            json.dump({"mode": "fit", "config": args.config, "rows": rows, "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=2)


def steps(args: argparse.Namespace) -> None:
    import statistics

    import torch
    from transformers import AutoModelForSequenceClassification

    from lora_ensemble import LoraEnsemble, LoraEnsembleConfig, TrunkCache
    from lora_ensemble.app.builders import minilm_path
    from lora_ensemble.losses import member_cross_entropy

    B, T, M, C = 16, 64, 4, 4
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (B, T), generator=g), "attention_mask": torch.ones(B, T, dtype=torch.long)}
    labels, ids = torch.randint(0, C, (B,), generator=g), torch.arange(B)
    kwargs = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cases = {}
    for k in (int(k) for k in args.ks.split(",")):
        for cached in (False, True):
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=C, **kwargs)
            ens = LoraEnsemble(model, LoraEnsembleConfig(num_members=M, r=8, target_modules="qkvo",
                                                         layers=list(range(-k, 0)), share_trunk=True)).train()
            opt = torch.optim.AdamW([p for p in ens.parameters() if p.requires_grad], lr=1e-4)
            forward = (lambda ens=ens, c=TrunkCache(ens): c(ids, **batch)) if cached else (lambda ens=ens: ens(**batch))

            def step(forward=forward, opt=opt) -> None:
                member_cross_entropy(forward(), labels).backward()
                opt.step()
                opt.zero_grad()

            cases[(k, cached)] = step
    times = {case: [] for case in cases}
    for case, step in cases.items():  # warm-up; fills the caches
        step(), step()
    for r in range(args.repeats):
        for case in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            start = time.perf_counter()
            cases[case]()
            times[case].append(time.perf_counter() - start)
    med = {case: statistics.median(ts) for case, ts in times.items()}
    print(f"MiniLM-L6, B={B}, T={T}, M={M}, r=8, q/k/v/o, share_trunk, training step, threads={torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| k | trunk computed s | trunk replayed s | speed-up |")
    print("|---:|---:|---:|---:|")
    rows = []
    for k in sorted({k for k, _ in cases}):
        plain, cached = med[(k, False)], med[(k, True)]
        rows.append({"k": k, "computed_s": plain, "replayed_s": cached})
        print(f"| {k} | {plain:.3f} | {cached:.3f} | {plain / cached:.2f}x |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"mode": "steps", "rows": rows, "times_s": {f"k={k}/{'replayed' if c else 'computed'}": ts
                                                                  for (k, c), ts in times.items()},
                       "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
