"""Measurement: bytes held, peak tensor memory, step times (interleaved round by round on CPU), peak RSS
in a fresh subprocess, and the machine and versions a run is made on."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import Tensor, nn

import lora_ensemble
from lora_ensemble.app.benchmark.options import BenchmarkOptions
from lora_ensemble.app.benchmark.peers import build_case
from lora_ensemble.core.batch import MemberModule
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.layers import linear_features
from lora_ensemble.core.targets import find_heads, find_targets


# ---- bytes ---------------------------------------------------------------------------------------------
def state_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers held by `modules`."""
    seen: dict[int, Tensor] = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def parameter_accounting(model: nn.Module, config: LoraEnsembleConfig) -> dict[str, Any]:
    """Check, to the byte, that LoraEnsemble(model, config) holds one frozen backbone + M x (adapters + head):

    adapters = sum over targets of r * (in + out) * itemsize per adapted (part of a) projection.
    `model` is wrapped in place."""
    heads = find_heads(model, config)
    targets = find_targets(model, config, heads)
    head_bytes = state_bytes(*[model.get_submodule(h) for h in heads]) if heads else 0
    backbone = state_bytes(model) - head_bytes
    adapter_bytes = 0
    for t in targets:
        itemsize = next(t.module.parameters()).element_size()
        if t.kind == "mha":
            e = t.module.embed_dim
            adapter_bytes += (len(t.parts) + t.adapt_out) * config.r * 2 * e * itemsize
        else:
            n_in, n_out = linear_features(t.module)
            parts = len(t.parts) if t.kind == "fused" else 1
            adapter_bytes += parts * config.r * (n_in + (n_out // 3 if t.kind == "fused" else n_out)) * itemsize
    expected = backbone + config.num_members * (adapter_bytes + head_bytes)
    ens = LoraEnsemble(model, config)
    actual = state_bytes(ens)
    adapter_buffers = {f"{n}.{b}": t.numel() * t.element_size() for n, m in ens.named_modules()
                       if isinstance(m, MemberModule) for b, t in m.named_buffers(recurse=False)}
    return {"backbone_bytes": backbone, "adapter_bytes_per_member": adapter_bytes, "head_bytes_per_member": head_bytes,
            "num_members": config.num_members, "expected_bytes": expected, "actual_bytes": actual,
            "difference_bytes": actual - expected, "exact": actual == expected,
            "adapter_buffer_bytes": sum(adapter_buffers.values()), "adapter_buffers": sorted(adapter_buffers)[:4]}


# ---- peak memory and time of the cases -----------------------------------------------------------------
@contextmanager
def _stderr_muted():
    """File descriptor 2 to /dev/null for a moment (C++ log lines that Python cannot silence)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _tensor_peak_growth(step: Callable[[], None], steps: int) -> int | None:
    """Run step() `steps` times under torch.profiler's memory profiling: the largest amount of tensor memory
    allocated since the first call and live at one moment (activations, gradients, optimizer state), from the
    allocation and free events in time order. None where the profiler gives no such events."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_muted():  # the profiler's C++ start line
        prof.start()
    try:
        for _ in range(steps):
            step()
    finally:
        with _stderr_muted():
            prof.stop()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak if events else None


def _prepare(case: str, opts: BenchmarkOptions) -> tuple[Callable[[], None], dict[str, Any]]:
    """Build one case, run its first `memory_steps` steps measuring peak memory, then the rest of `warmup`;
    returns the case's step and its memory facts. peak_bytes = what the case holds + the most its steps add
    at one moment (CPU: the profiler's tensor allocations; CUDA: max_memory_allocated growth over the
    allocation before building)."""
    cuda = torch.device(opts.device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step, held, n_trainable = build_case(case, opts)
    facts = {"status": "ok", "state_bytes": state_bytes(*held), "trainable_params": n_trainable}
    memory_steps = opts.memory_steps if case.endswith("/train") else 1  # no optimizer state in inference
    if cuda:
        for _ in range(memory_steps):
            _timed_step(step, cuda)
        facts.update(peak_bytes=torch.cuda.max_memory_allocated() - base, peak_method="cuda max_memory_allocated growth")
    else:
        growth = _tensor_peak_growth(step, memory_steps)
        facts.update(peak_bytes=None if growth is None else facts["state_bytes"] + growth,
                     peak_method="state bytes + peak of live tensor bytes allocated by the steps (torch.profiler)")
    for _ in range(opts.warmup - memory_steps):  # the rest of the warm-up
        step()
    return step, facts


def _timed_step(step: Callable[[], None], cuda: bool) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one step."""
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_cases(cases: list[str], opts: BenchmarkOptions, interleave: bool, deadline: float | None = None,
              log: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, Any]]:
    """Prepare every case (build, memory steps, the rest of the warm-up), then time `repeats` steps of each
    (fewer after `deadline`, a time.monotonic() value; always at least one).

    interleave: all cases are prepared and held at once, then timed round by round (each round runs every
    case once, odd rounds in reverse order), so that load from other work on a shared machine falls on all
    cases alike. Otherwise each case
    is prepared, timed and dropped before the next (and none starts after `deadline`)."""
    cuda = torch.device(opts.device).type == "cuda"
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], None]] = {}
    times: dict[str, list[tuple[float, float]]] = {}

    def run_round(cases_now: list[str]) -> None:
        for case in cases_now:
            try:
                t = _timed_step(steps[case], cuda)
            except Exception as e:  # e.g. out of memory: reported, the other cases go on
                results[case] = {"status": "error", "error": f"{type(e).__name__}: {e}", "memory": results[case]}
                del steps[case]
                continue
            times[case].append(t)

    def finish(case: str) -> None:
        if case in steps:
            wall, cpu_s = [t for t, _ in times[case]], [c for _, c in times[case]]
            results[case].update(median_s=statistics.median(wall), min_s=min(wall), times_s=wall,
                                 median_cpu_s=statistics.median(cpu_s), cpu_times_s=cpu_s)
            log(f"  {case:<24} median {results[case]['median_s']:.3f} s, peak {(results[case]['peak_bytes'] or 0) / 2**20:.0f} MB")

    for case in cases:
        if not interleave and deadline is not None and time.monotonic() > deadline:
            results[case] = {"status": "skipped", "error": f"time budget of {opts.budget_s} s spent"}
            continue
        try:
            steps[case], results[case] = _prepare(case, opts)
            times[case] = []
        except ModuleNotFoundError as e:
            results[case] = {"status": "skipped", "error": str(e)}
        except Exception as e:  # one failing peer must not lose the other measurements
            results[case] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        if case not in steps:
            log(f"  {case:<24} {results[case]['status']}: {results[case]['error']}")
        elif interleave:
            log(f"  {case:<24} built, peak {(results[case]['peak_bytes'] or 0) / 2**20:.0f} MB")
        else:
            for i in range(opts.repeats):
                if i > 0 and deadline is not None and time.monotonic() > deadline:
                    break
                run_round([case])
            finish(case)
            steps.pop(case, None)
    if interleave:
        log(f"  timing {len(steps)} cases round by round ({opts.repeats} rounds) ...")
        for i in range(opts.repeats):
            if i > 0 and deadline is not None and time.monotonic() > deadline:
                break
            run_round(list(steps)[::-1] if i % 2 else list(steps))
        for case in list(steps):
            finish(case)
    return results


# ---- peak RSS in a fresh process (a cross-check of the tensor peak on CPU) ----------------------------
def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_peak(case: str, opts: BenchmarkOptions) -> int | None:
    """In this (fresh) process: peak RSS during the case's first `memory_steps` steps - RSS before building.
    VmHWM is reset after building (Linux), so loading transients are not counted; None where unavailable."""
    method = case.split("/")[0]
    for name in ("transformers",) + (("peft",) if method in ("peft_mixed", "naive_loop") else ()):
        __import__(name)  # imported before the baseline, so the import is not the case's memory
    gc.collect()
    base = _proc_status("VmRSS")
    step, _, _ = build_case(case, opts)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        return None
    for _ in range(opts.memory_steps):
        step()
    peak = _proc_status("VmHWM")
    return None if base is None or peak is None else peak - base


def _rss_isolated(case: str, opts: BenchmarkOptions) -> int | None:
    src = os.path.dirname(os.path.dirname(os.path.abspath(lora_ensemble.__file__)))  # the folder that holds the package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    code = "from lora_ensemble.app.benchmark.measure import _child_main; _child_main()"
    request = json.dumps({"case": case, "options": asdict(opts)})
    proc = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def _child_main() -> None:
    request = json.loads(sys.stdin.read())
    opts = BenchmarkOptions(**request["options"])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(json.dumps(rss_peak(request["case"], opts)))


# ---- the machine ---------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_bytes": (_meminfo_total() or None),
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _meminfo_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0


def versions() -> dict[str, str | None]:
    result = {"python": platform.python_version(), "torch": torch.__version__, "lora_ensemble": lora_ensemble.__version__}
    for name in ("transformers", "peft", "timm"):
        try:
            result[name] = __import__(name).__version__
        except ImportError:
            result[name] = None
    return result
