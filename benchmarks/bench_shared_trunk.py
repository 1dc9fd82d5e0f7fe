"""Shared trunk: forward time with adapters in the last k of L blocks, against its ideal.

ideal(k) = (L-k)/L * t(base on B rows) + k/L * t(base on M*B rows): the frozen blocks before the first
adapted one run once on the B original rows, the rest on the M*B member-major rows. Reports, for each k,
LoRA-Ensemble with share_trunk=False and =True, as a multiple of ideal(k). Inference (no_grad), median of
--repeats after a warm-up, all cases timed round by round so load falls on every case alike.

    python benchmarks/bench_shared_trunk.py [--batch-size 8 --seq-len 128 --members 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from transformers import AutoModelForSequenceClassification

    from lora_ensemble import LoraEnsemble, LoraEnsembleConfig
    from lora_ensemble.app.builders import minilm_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ks", default="1,2,3,6")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    B, T, M = args.batch_size, args.seq_len, args.members
    load = lambda: AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=4).eval()  # noqa: E731
    L = load().config.num_hidden_layers
    ids = torch.randint(1000, 20000, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    base = load()
    cases = {"base/B": lambda: base(input_ids=ids, attention_mask=mask),
             "base/MB": lambda: base(input_ids=ids.repeat(M, 1), attention_mask=mask.repeat(M, 1))}
    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        for share in (False, True):
            cfg = LoraEnsembleConfig(num_members=M, r=args.rank, target_modules="qkvo", layers=list(range(-k, 0)),
                                     share_trunk=share)
            ens = LoraEnsemble(load(), cfg).eval()
            cases[f"k={k}/{'shared' if share else 'plain'}"] = lambda ens=ens: ens(input_ids=ids, attention_mask=mask)
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for name, f in cases.items():  # warm-up
            f()
        for r in range(args.repeats):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    print(f"MiniLM-L6 (L={L}), B={B}, T={T}, M={M}, r={args.rank}, q/k/v/o, fp32, threads={torch.get_num_threads()}")
    print("| k (adapted last blocks) | ideal s | plain s | plain / ideal | shared s | shared / ideal | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        ideal = (L - k) / L * med["base/B"] + k / L * med["base/MB"]
        plain, shared = med[f"k={k}/plain"], med[f"k={k}/shared"]
        rows.append({"k": k, "ideal_s": ideal, "plain_s": plain, "shared_s": shared})
        print(f"| {k} | {ideal:.3f} | {plain:.3f} | {plain / ideal:.2f} | {shared:.3f} | {shared / ideal:.2f} | "
              f"{plain / shared:.2f}x |")
    print(f"base on B rows: {med['base/B']:.3f} s, on M*B rows: {med['base/MB']:.3f} s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"options": vars(args), "median_s": med, "rows": rows, "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
