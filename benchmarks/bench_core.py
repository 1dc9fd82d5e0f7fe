"""The CPU benchmark of issue 6: LoRA-Ensemble against its limit and its peers on all-MiniLM-L6-v2.

    python benchmarks/bench_core.py                       # MiniLM-L6, B=8, T=128, M=8, r=8, q/k/v/o, fp32 (~5 min)
    python benchmarks/bench_core.py --repeats 5 --output results/core.json
    python benchmarks/bench_core.py --help                # every option of `lora-ensemble benchmark`

Writes the JSON report (machine, versions, date, options, every case, ratios, targets) to --output
(default: benchmarks/results/core-<date>.json) and prints the table. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import lora_ensemble  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "src"))

from lora_ensemble.app.benchmark import add_arguments, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.set_defaults(output=os.path.join(ROOT, "benchmarks", "results", f"core-{stamp}.json"))
    args = parser.parse_args(argv)
    report = run_from_args(args)
    print(f"JSON report: {args.output}")
    return report


if __name__ == "__main__":
    main()
