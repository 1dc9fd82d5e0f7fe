"""The run (`run_benchmark`), its ratios and targets (`summarize`), the table (`format_report`) and the
command line (`add_arguments`, `run_from_args`)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from lora_ensemble.app.benchmark.measure import _rss_isolated, machine_info, parameter_accounting, run_cases, versions
from lora_ensemble.app.benchmark.options import CASES, PEERS, TARGETS, BenchmarkOptions
from lora_ensemble.app.benchmark.workloads import MODELS
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.io import atomic_write_bytes


# ---- the run -------------------------------------------------------------------------------------------
def summarize(cases: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ratios of every case to the limit in its mode and of LoRA-Ensemble to each peer (by median wall time,
    min wall time, median CPU time, and, where both were timed in the same rounds, the median of the per-round
    ratios), of peak memory likewise; and the targets."""
    def ratio(a: str, b: str, key: str) -> float | None:
        ca, cb = cases.get(a, {}), cases.get(b, {})
        ok = ca.get("status") == cb.get("status") == "ok" and ca.get(key) is not None and cb.get(key)
        return ca[key] / cb[key] if ok else None

    def paired(a: str, b: str) -> float | None:
        ta, tb = cases.get(a, {}).get("times_s"), cases.get(b, {}).get("times_s")
        return statistics.median(x / y for x, y in zip(ta, tb)) if ta and tb and len(ta) == len(tb) else None

    def against(case: str, other: str) -> dict[str, float | None]:
        return {"time": ratio(case, other, "median_s"), "time_min": ratio(case, other, "min_s"),
                "time_paired": paired(case, other), "cpu_time": ratio(case, other, "median_cpu_s"),
                "peak": ratio(case, other, "peak_bytes")}

    ratios: dict[str, Any] = {}
    for case in cases:
        mode = case.split("/")[1]
        ratios[case] = {"vs_limit": against(case, f"limit/{mode}")}
        if case.startswith("lora_ensemble/"):
            ratios[case]["vs_peer"] = {p: against(case, f"{p}/{mode}") for p in PEERS if f"{p}/{mode}" in cases}
    targets = []
    for name, a, b, bound, key in TARGETS:
        r = against(a, b)
        value = r["time" if key == "median_s" else "peak"]
        met = None if value is None else (value < bound if bound == 1.0 else value <= bound)
        targets.append({"target": name, "ratio": value, "bound": bound, "met": met,
                        **({"ratio_min": r["time_min"], "ratio_paired": r["time_paired"], "ratio_cpu_time": r["cpu_time"]}
                           if key == "median_s" else {})})
    return ratios, targets


def run_benchmark(**options: Any) -> dict[str, Any]:
    """Run every case of `BenchmarkOptions(**options)`; returns (and with `output`, writes) the JSON report."""
    opts = BenchmarkOptions(**options)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cpu = torch.device(opts.device).type == "cpu"
    interleave = cpu if opts.interleave is None else opts.interleave
    deadline = None if opts.budget_s is None else time.monotonic() + opts.budget_s
    report: dict[str, Any] = {"schema": 1, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "machine": machine_info(opts.device), "versions": versions(),
                              "options": dict(asdict(opts), interleave=interleave), "cases": {}}
    started = time.monotonic()

    def log(line: str) -> None:
        if not opts.quiet:
            print(f"[{time.monotonic() - started:5.0f} s] {line}", file=sys.stderr, flush=True)

    cases = report["cases"]
    cases.update(run_cases(list(opts.cases), opts, interleave, deadline, log))
    if opts.rss and cpu:
        for case in opts.cases:
            if cases[case]["status"] == "ok":
                cases[case]["peak_rss_bytes"] = _rss_isolated(case, opts)
                log(f"  {case:<24} peak RSS growth {(cases[case]['peak_rss_bytes'] or 0) / 2**20:.0f} MB")
    torch.manual_seed(opts.seed)
    report["accounting"] = parameter_accounting(
        MODELS[opts.model][0](opts.num_labels),
        LoraEnsembleConfig(num_members=opts.num_members, r=opts.r, target_modules=opts.target_modules, seed=opts.seed))
    report["ratios"], report["targets"] = summarize(cases)
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if opts.output:
        atomic_write_bytes(opts.output, json.dumps(report, indent=2).encode())
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table: times and peak memory, absolute and as multiples of the limit."""
    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"{'case':<24} {'median s':>9} {'x limit':>8} {'paired':>7} {'min s':>8} {'x limit':>8} {'cpu x':>6} "
             f"{'peak MB':>8} {'x limit':>8} {'state MB':>9}"]
    for case, c in report["cases"].items():
        if c["status"] != "ok":
            lines.append(f"{case:<24} {c['status']}: {c['error']}")
            continue
        r = report["ratios"][case]["vs_limit"]
        peak = None if c.get("peak_bytes") is None else c["peak_bytes"] / 2**20
        lines.append(f"{case:<24} {c['median_s']:>9.3f} {fmt(r['time']):>8} {fmt(r['time_paired']):>7} "
                     f"{c['min_s']:>8.3f} {fmt(r['time_min']):>8} {fmt(r['cpu_time']):>6} {fmt(peak, '.0f'):>8} "
                     f"{fmt(r['peak']):>8} {c['state_bytes'] / 2**20:>9.1f}")
    for case in ("lora_ensemble/inference", "lora_ensemble/train"):
        peers = report["ratios"].get(case, {}).get("vs_peer", {})
        shown = ", ".join(f"{p} {fmt(v['time'])} (min {fmt(v['time_min'])})" for p, v in peers.items() if v["time"])
        if shown:
            lines.append(f"{case} time / peer time: {shown}")
    a = report["accounting"]
    lines.append(f"state bytes: LoRA-Ensemble {a['actual_bytes']} = backbone {a['backbone_bytes']} + "
                 f"{a['num_members']} x ({a['adapter_bytes_per_member']} + {a['head_bytes_per_member']})"
                 f" -> {'exact' if a['exact'] else 'differs by %d bytes' % a['difference_bytes']}"
                 + (f" (adapter index buffers: {a['adapter_buffer_bytes']} bytes)" if a["adapter_buffer_bytes"] else ""))
    for t in report["targets"]:
        extra = "".join(f", {k[6:]} {fmt(t[k], '.3f')}" for k in ("ratio_paired", "ratio_min", "ratio_cpu_time") if k in t)
        shown = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f} ({'met' if t['met'] else 'NOT met'}{extra})"
        lines.append(f"target {t['target']}: {shown}")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    parser.add_argument("--model", default=d.model, choices=list(MODELS), help="model to measure (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="samples B per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens T per text sample (default: %(default)s)")
    parser.add_argument("--num-members", type=int, default=d.num_members, help="ensemble size M (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.r, help="LoRA rank r (default: %(default)s)")
    parser.add_argument("--target-modules", default=d.target_modules, help="projections adapted (default: %(default)s)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per case (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="forward under autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rss", action="store_true", help="CPU: also peak RSS growth, a fresh subprocess per case")
    parser.add_argument("--no-interleave", action="store_true", help="time each case alone, one after the other")
    parser.add_argument("--memory-steps", type=int, default=d.memory_steps, help="steps of each memory run (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop adding timed rounds after this many seconds")
    parser.add_argument("--output", default=None, help="write the JSON report here")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    report = run_benchmark(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len,
                           num_members=args.num_members, r=args.rank, target_modules=args.target_modules,
                           cases=args.cases, warmup=args.warmup, repeats=args.repeats, device=args.device,
                           autocast=args.autocast, threads=args.threads, rss=args.rss,
                           interleave=False if args.no_interleave else None, memory_steps=args.memory_steps,
                           budget_s=args.budget_s, output=args.output)
    print(format_report(report))
    return report
