"""Prototype: faster `LoraEnsembleLinear.forward` variants, measured against the current one and the limit.

    python benchmarks/prototype_lora_forward.py [--batch-size 4] [--rounds 5] [--threads 1]

Variants (patched onto the layers of separate LoraEnsemble instances, so all run in one process and are
timed interleaved, round by round: on a shared machine contention then hits every variant alike):

    current   layers.py as it is (since this prototype: in-place deltas without autograd, and in training
              the fused function of `fused` below, as `_LinearWithMemberDeltas`); see benchmarks/ab_layers.py
    inplace   y = base(x); y.baddbmm_(h, B^T)                                    (no second full-size tensor)
    fused     inplace + a custom autograd.Function whose backward adds the LoRA input gradient into the
              frozen layer's input gradient in place (grad_x = g W, then grad_x.baddbmm_(g_h, A)), so backward
              allocates one full-size tensor per layer, as the frozen layer alone does
All variants are checked to give the same outputs and gradients as `current` before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from lora_ensemble.benchmark import BenchmarkOptions, _build_case
from lora_ensemble.layers import LoraEnsembleLinear


def forward_inplace(self, x):
    M = self.num_members
    y = self.base_layer(x)
    h = torch.bmm(self.lora_dropout(x).reshape(M, -1, self.in_features), self.lora_A.to(x.dtype).transpose(1, 2))
    y.view(M, -1, self.out_features).baddbmm_(h, self.lora_B.to(x.dtype).transpose(1, 2), alpha=self.scaling)
    return y


class _FusedLora(torch.autograd.Function):
    """y = x W^T + b + s (x A_m^T) B_m^T per member, W frozen; x: (M*N, in) member-major."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, M):
        y = F.linear(x, weight, bias)
        x3 = x.reshape(M, -1, x.shape[-1])
        h = torch.bmm(x3, A.transpose(1, 2))
        y.view(M, -1, y.shape[-1]).baddbmm_(h, B.transpose(1, 2), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scaling, ctx.M = scaling, M
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B, h = ctx.saved_tensors
        M, s = ctx.M, ctx.scaling
        g3 = g.reshape(M, -1, g.shape[-1])
        gh = torch.bmm(g3, B)                                             # (M, N, r), times s below
        if s != 1.0:
            gh = gh * s
        gB = torch.bmm(g3.transpose(1, 2), h) * s if s != 1.0 else torch.bmm(g3.transpose(1, 2), h)
        gA = torch.bmm(gh.transpose(1, 2), x.reshape(M, -1, x.shape[-1]))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(g, weight)                                  # the frozen layer's input gradient
            gx.view(M, -1, gx.shape[-1]).baddbmm_(gh, A)                  # + the members' LoRA part, in place
        return gx, None, None, gA, gB, None, None


def forward_fused(self, x):
    base = self.base_layer
    if not isinstance(base, torch.nn.Linear) or base.weight.requires_grad or torch.is_autocast_enabled(x.device.type) \
            or not isinstance(self.lora_dropout, torch.nn.Identity):
        return forward_inplace(self, x)
    return _FusedLora.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, self.num_members)


VARIANTS = {"current": None, "inplace": forward_inplace, "fused": forward_fused}


def patch(ens, forward):
    for module in ens.modules():
        if isinstance(module, LoraEnsembleLinear) and forward is not None:
            module.forward = types.MethodType(forward, module)


def build(mode, variant, opts):
    step, held, _ = _build_case(("limit/" if variant == "limit" else "lora_ensemble/") + mode, opts)[:3]
    if variant != "limit":
        patch(held[0], VARIANTS[variant])
    return step, held[0]


def check_equal(opts):
    """Every variant: same logits and same LoRA gradients as `current` (B made non-zero first)."""
    results = {}
    for variant in VARIANTS:
        _, ens = build("train", variant, opts)
        ens.eval()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in ens.member_parameters().items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ids = torch.randint(1000, 30000, (2, 16), generator=g)
        out = ens(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.square().mean().backward()
        results[variant] = (out.detach(), {n: p.grad.clone() for n, p in ens.member_parameters().items()})
    ref_out, ref_grads = results["current"]
    for variant, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-3)
    print("outputs and gradients agree for", list(VARIANTS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = BenchmarkOptions(batch_size=args.batch_size)
    check_equal(BenchmarkOptions(batch_size=2, seq_len=16))
    for mode in args.modes.split(","):
        steps = {v: build(mode, v, opts)[0] for v in ["limit", *VARIANTS]}
        for step in steps.values():
            step()  # warm-up
        times = {v: [] for v in steps}
        for _ in range(args.rounds):
            for v, step in steps.items():
                start = time.perf_counter()
                step()
                times[v].append(time.perf_counter() - start)
        limit = statistics.median(times["limit"])
        for v, ts in times.items():
            paired = statistics.median(t / lt for t, lt in zip(ts, times["limit"]))
            print(f"{mode:<9} {v:<8} median {statistics.median(ts):7.3f} s  min {min(ts):7.3f} s  "
                  f"x limit: median {statistics.median(ts) / limit:5.3f}  min {min(ts) / min(times['limit']):5.3f}  "
                  f"per-round {paired:5.3f}")


if __name__ == "__main__":
    main()
