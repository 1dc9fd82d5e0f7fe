"""A/B of the adapted layers: the current fast paths against the generic autograd path, and the limit.

The default case (MiniLM-L6, B=8, T=128, M=8, r=8, q/k/v/o; --batch-size, --seq-len, --num-members change it). One ensemble runs twice per round, once as it is
(inference: deltas added in place; training: `_LinearWithMemberDeltas`) and once with those paths switched off
(out-of-place `baddbmm`, autograd's generic backward); the frozen model on M*B rows is the limit. All three are
timed interleaved round by round, and the paired ratio is the median over rounds of case / limit in that round.

    python benchmarks/ab_layers.py --mode inference --threads 2 --rounds 15
    python benchmarks/ab_layers.py --mode train --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

from lora_ensemble.app.benchmark import BenchmarkOptions, build_case  # noqa: E402
from lora_ensemble.core import layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["inference", "train"], default="inference")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-members", type=int, default=8)
    p.add_argument("--model", default="minilm", help="a model of lora_ensemble.app.benchmark.MODELS (default: minilm)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = BenchmarkOptions(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, num_members=args.num_members)
    limit = build_case(f"limit/{args.mode}", opts)[0]
    ensemble = build_case(f"lora_ensemble/{args.mode}", opts)[0]
    fast = (layers._in_place, layers._fused_training)

    def run(current: bool) -> None:
        if not current:
            layers._in_place = lambda y, num_members: False
            layers._fused_training = lambda layer, x: False
        try:
            ensemble()
        finally:
            layers._in_place, layers._fused_training = fast

    cases = {"limit": limit, "current": lambda: run(True), "generic": lambda: run(False)}
    for step in cases.values():  # warm-up
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    limit_median = statistics.median(times["limit"])
    print(f"{args.mode}, threads={torch.get_num_threads()}, {args.rounds} rounds")
    for name, ts in times.items():
        paired = statistics.median(t / base for t, base in zip(ts, times["limit"]))
        print(f"{name:8s} median {statistics.median(ts):.3f} s  x limit {statistics.median(ts) / limit_median:.3f}  "
              f"paired {paired:.3f}")


if __name__ == "__main__":
    main()
