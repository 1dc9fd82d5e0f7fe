"""The peers LoRA-Ensemble is measured against (vmap over stacked member copies, PEFT adapters) and the
step of each case (`build_case`)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ensemble.app.benchmark.options import BenchmarkOptions
from lora_ensemble.app.benchmark.workloads import MODELS
from lora_ensemble.core.batch import expand_batch, output_tensor
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble, set_submodule
from lora_ensemble.core.layers import PART_INDEX, init_lora_A, is_conv1d, linear_features
from lora_ensemble.core.targets import Target, find_heads, find_targets


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


# ---- one case ------------------------------------------------------------------------------------------
def build_case(case: str, opts: BenchmarkOptions) -> tuple[Callable[[], None], list[nn.Module], int]:
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
