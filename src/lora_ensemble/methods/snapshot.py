"""`snapshot`: Snapshot Ensembles (Huang et al. 2017): one network, fully fine-tuned with a cyclic cosine learning
rate of C >= M cycles (`cycles`, default C = M); the weights at the end of each of the last M cycles are the
members (Huang et al. also ensemble only the last snapshots when there are more cycles than members).

Training of T steps (0-based step index t) is split into C cycles; cycle c covers steps [e_{c-1}, e_c) with
e_c = floor((c + 1) T / C), e_{-1} = 0 (lengths differ by at most one step). Within a cycle of length L the
learning rate multiplier is

    lr_lambda(t) = 0.5 * (1 + cos(pi * (t - e_{c-1}) / L))        (1 at the cycle's first step, ~0 at its last)

After the optimizer step of the cycle's last step (t = e_c - 1), `on_train_batch_end` stores every trainable
parameter as snapshot k = c - (C - M) when k >= 0 (the first C - M cycles only train): buffers
`snapshots.<parameter name>` of shape (M, ...), plus `num_snapshots`, so checkpoints carry them. Eval:

    K = num_snapshots == M:   the M snapshots                               -> (M, B, C)
    K < M (training cut short, or evaluation during training):
                              the K snapshots so far + the live weights    -> (K + 1, B, C)

The snapshots run through the model with `functional_call` (one vmap over snapshots, or a loop; buffers such
as position ids are the live model's). Training returns the live model's pass (1, B, C).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lora_ensemble.core.batch import check_num_members
from lora_ensemble.methods._stacked import StackedCall, single_output


class SnapshotEnsemble(nn.Module):
    """One fully fine-tuned `model` plus M stored snapshots of its parameters."""

    def __init__(self, model: nn.Module, num_members: int = 4, vectorize: bool | None = None,
                 cycles: int | None = None):
        super().__init__()
        check_num_members(num_members, "cycles")
        if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < num_members):
            raise ValueError(f"cycles must be an integer >= num_members={num_members} (the last num_members cycle "
                             f"ends are the members), got {cycles!r}")
        self.num_members = num_members
        self.cycles = num_members if cycles is None else cycles
        self.model = model.requires_grad_(True)
        self.snapshots = nn.Module()
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            holder = self.snapshots
            for part in owner.split(".") if owner else []:
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            holder.register_buffer(leaf, p.detach().new_zeros(num_members, *p.shape))
        self.register_buffer("num_snapshots", torch.zeros((), dtype=torch.long))
        self.call = StackedCall(vectorize, owner="snapshot")

    # ---- training hooks --------------------------------------------------------------------------------
    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        """The cyclic cosine multiplier for a run of `total_steps` optimizer steps (see the module docstring)."""
        ends = self.cycle_ends(total_steps)

        def multiplier(step: int) -> float:
            c = _cycle_of(step, ends)
            start = ends[c - 1] if c > 0 else 0
            length = ends[c] - start
            return 0.5 * (1.0 + math.cos(math.pi * min(step - start, length) / length))

        return multiplier

    def on_train_batch_end(self, step: int, total_steps: int) -> None:
        """After the optimizer step of 0-based step `step`: store snapshot c - (C - M) when `step` ends cycle c.

        `EnsembleModule` calls it once per optimizer step (not per micro-batch under gradient accumulation),
        with the same `step` whose learning rate `lr_lambda(step)` gave."""
        ends = self.cycle_ends(total_steps)
        if step + 1 in ends:
            c = ends.index(step + 1) - (self.cycles - self.num_members)  # the snapshot slot of this cycle's end
            if c < 0:
                return  # one of the first C - M cycles: trains only
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    self.snapshots.get_buffer(name)[c].copy_(p.detach())
                self.num_snapshots.fill_(max(int(self.num_snapshots), c + 1))

    def cycle_ends(self, total_steps: int) -> list[int]:
        """e_c for c = 0..C-1: the number of steps done when cycle c ends."""
        C = self.cycles
        if not isinstance(total_steps, int) or total_steps < C:
            what = f"num_members={C}" if C == self.num_members else f"cycles={C}"
            raise ValueError(f"snapshot needs at least {what} training steps (one per cycle), got {total_steps!r}")
        return [(c + 1) * total_steps // C for c in range(C)]

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Training: (1, B, ...) from the live weights. Eval: (M, B, ...), or (K + 1, B, ...) before the end."""
        K = int(self.num_snapshots)
        if self.training or K == 0:
            return single_output(self.model, args, kwargs)
        stacked = {name: buf[:K] for name, buf in self.snapshots.named_buffers()}
        out = self.call(self.model, stacked, args, kwargs)
        if K < self.num_members:
            out = torch.cat([out, single_output(self.model, args, kwargs)])
        return out


def _cycle_of(step: int, ends: list[int]) -> int:
    for c, end in enumerate(ends):
        if step < end:
            return c
    return len(ends) - 1  # steps past the planned end stay at the last cycle's floor
