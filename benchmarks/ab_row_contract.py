"""A/B: the row contract's checks on and off (check_rows patched to a no-op), interleaved in one process.

    python benchmarks/ab_row_contract.py --threads 1 --rounds 9
Default case: all-MiniLM-L6-v2, B=8, T=128, M=8, r=8, q/k/v/o; inference under no_grad and inference_mode.
Prints the median time of each variant and the median of the per-round ratios (checks on / off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lora_ensemble import LoraEnsemble
from lora_ensemble.app.benchmark import MODELS
from lora_ensemble.core.batch import MemberModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--output", help="write the measurements as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    build, inputs = MODELS["minilm"]
    torch.manual_seed(0)
    ens = LoraEnsemble(build(4), num_members=8, r=8, target_modules="qkvo").eval()
    batch = inputs(ens.model, 8, 128, torch.Generator().manual_seed(0))
    real = MemberModule.check_rows
    times: dict[str, list[float]] = {}
    for _ in range(a.rounds + 1):  # the first round warms up
        for checks in (True, False):
            for mode in ("no_grad", "inference_mode"):
                MemberModule.check_rows = real if checks else (lambda self, x: x.shape[self.member_axis] // self.num_members)
                ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
                with ctx:
                    start = time.perf_counter()
                    ens(**batch)
                    times.setdefault(f"{mode}/{'on' if checks else 'off'}", []).append(time.perf_counter() - start)
    MemberModule.check_rows = real
    result = {"threads": a.threads, "rounds": a.rounds, "date": time.strftime("%Y-%m-%d")}
    for mode in ("no_grad", "inference_mode"):
        on, off = times[f"{mode}/on"][1:], times[f"{mode}/off"][1:]
        result[mode] = {"on_median_s": statistics.median(on), "off_median_s": statistics.median(off),
                        "paired_ratio": statistics.median(x / y for x, y in zip(on, off))}
        print(f"{mode:15s} checks on {result[mode]['on_median_s']:.3f} s  off {result[mode]['off_median_s']:.3f} s  "
              f"paired on/off {result[mode]['paired_ratio']:.3f}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
