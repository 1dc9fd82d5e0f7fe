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

The package, one module per part: `workloads` (the models measured and their inputs), `options` (the cases and
`BenchmarkOptions`), `peers` (the peer implementations and the step of each case), `measure` (time, peak
memory, state bytes, the machine), `report` (the run, the ratios and targets, the table, the command line).
"""

from __future__ import annotations

from lora_ensemble.app.benchmark.measure import parameter_accounting, rss_peak, run_cases, state_bytes
from lora_ensemble.app.benchmark.options import CASES, IMPLEMENTATIONS, PEERS, TARGETS, BenchmarkOptions
from lora_ensemble.app.benchmark.peers import MemberLora, VmapMembers, build_case, peft_ensemble, vmap_ensemble
from lora_ensemble.app.benchmark.report import add_arguments, format_report, run_benchmark, run_from_args, summarize
from lora_ensemble.app.benchmark.workloads import MODELS, bert_tiny

__all__ = ["CASES", "IMPLEMENTATIONS", "MODELS", "PEERS", "TARGETS", "BenchmarkOptions", "MemberLora", "VmapMembers",
           "bert_tiny", "build_case", "add_arguments", "format_report", "parameter_accounting",
           "peft_ensemble", "rss_peak", "run_benchmark", "run_cases", "run_from_args", "state_bytes", "summarize",
           "vmap_ensemble"]
