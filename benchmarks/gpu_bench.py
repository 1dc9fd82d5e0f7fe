"""LoRA-Ensemble against its limit and its peers on a CUDA machine, in under 3 minutes.

    python benchmarks/gpu_bench.py results/gpu.json                        # ViT-B/32-sized, M=16, B=32, bf16 autocast
    python benchmarks/gpu_bench.py /tmp/smoke.json --device cpu --tiny     # smoke test of this script, anywhere

The model is a randomly initialised ViT-B/32 (timm `VisionTransformer`, 224 px, patch 32, width 768, depth 12;
an HF ViTConfig of the same size when timm is missing), adapters on q/k/v/o, weights fp32, forwards under
torch.autocast(bfloat16). Every case is built, timed and measured alone (peak: torch.cuda.max_memory_allocated);
a case that fails (e.g. out of memory) is reported as an error and the others still run; no case starts after
--budget-s seconds. The JSON report goes to the path given; the table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import lora_ensemble  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402

from lora_ensemble.app.benchmark import CASES, format_report, run_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="path of the JSON report")
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a 2-block ViT, M=4, B=4, one step per case: a smoke test")
    parser.add_argument("--num-members", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "float16", "none"])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="no case starts after this (default: %(default)s)")
    args = parser.parse_args(argv)

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                     "use --device cpu --tiny for a smoke test")
    has_timm = importlib.util.find_spec("timm") is not None
    options = dict(model="vit-b32" if has_timm else "vit-b32-hf", num_members=args.num_members,
                   batch_size=args.batch_size, r=args.rank, warmup=args.warmup, repeats=args.repeats)
    if args.tiny:
        options.update(model="vit-tiny" if has_timm else "bert-tiny", num_members=4, batch_size=4, warmup=0, repeats=1)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (loss, optimizer) as usual
        torch.backends.cudnn.allow_tf32 = True
    report = run_benchmark(**options, target_modules="qkvo", cases=args.cases, device=args.device,
                           autocast=None if args.autocast == "none" else args.autocast,
                           interleave=False, budget_s=args.budget_s, output=args.output)
    print(format_report(report))
    print(f"JSON report: {args.output}")
    return report


if __name__ == "__main__":
    main()
