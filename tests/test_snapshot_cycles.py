"""Snapshot ensembles with more cycles than members: the first C - M cycles only train, the last M are the members."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_ensemble.methods import build_method


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def train(method, total):
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, method.lr_lambda(total))
    weights, lrs = [], []
    g = torch.Generator().manual_seed(0)
    for step in range(total):
        method.train()
        lrs.append(opt.param_groups[0]["lr"] / 0.1)
        method(torch.randn(4, 3, generator=g)).pow(2).mean().backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        method.on_train_batch_end(step, total)
        weights.append(method.model.lin.weight.detach().clone())
    return weights, lrs


def test_the_last_m_cycle_ends_are_the_members():
    torch.manual_seed(0)
    method = build_method("snapshot", Net(), num_members=2, cycles=4)
    weights, lrs = train(method, 8)  # cycles of 2 steps: ends after steps 1, 3, 5, 7; members: steps 5 and 7
    assert lrs == pytest.approx([1, 0.5] * 4)
    assert int(method.num_snapshots) == 2
    torch.testing.assert_close(method.snapshots.lin.weight[0], weights[5])
    torch.testing.assert_close(method.snapshots.lin.weight[1], weights[7])


def test_cycles_default_to_the_members_and_fewer_cycles_than_members_are_refused():
    assert build_method("snapshot", Net(), num_members=3).cycles == 3
    with pytest.raises(ValueError, match="cycles must be an integer >= num_members=3"):
        build_method("snapshot", Net(), num_members=3, cycles=2)
    with pytest.raises(ValueError, match="at least cycles=5 training steps"):
        build_method("snapshot", Net(), num_members=2, cycles=5).cycle_ends(4)
