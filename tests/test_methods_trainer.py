"""Every method trained through Lightning's `Trainer.fit`, as `lora-ensemble fit` trains it, then its members checked."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from tiny_models import NUM_LABELS, build, call
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from lora_ensemble.core.heads import member_head
from lora_ensemble.lightning.module import EnsembleModule
from lora_ensemble.methods import METHODS, build_method

M, B = 3, 2


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap falls back per op for SDPA on CPU
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield


class Batches(Dataset):
    """`count` fixed batches of B samples of the model's inputs plus labels; one item is one whole batch."""

    def __init__(self, make_batch, count: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            inputs = make_batch(B, g)
            inputs = inputs if isinstance(inputs, dict) else {"x": inputs[0]}
            self.items.append({**inputs, "labels": torch.randint(0, NUM_LABELS, (B,), generator=g)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class EveryOptimizerStep(L.Callback):
    """The learning rate each optimizer step used and the live weights after it, taken from torch's own
    optimizer step hooks (independent of Lightning's step counting)."""

    def __init__(self):
        self.lrs: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda opt, *_: self.lrs.append(opt.param_groups[0]["lr"]))
        optimizer.register_step_post_hook(lambda *_: self.weights.append(
            {n: p.detach().clone() for n, p in module.method.model.named_parameters()}))


def fit(method, make_batch, batches: int, epochs: int = 1, accumulate: int = 1, lr: float = 1e-2):
    """Train `method` through Trainer.fit on CPU; returns the EveryOptimizerStep record."""
    record = EveryOptimizerStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=accumulate,
                        callbacks=[record], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(EnsembleModule(method, lr=lr), DataLoader(Batches(make_batch, batches), batch_size=None))
    return record


# ---- snapshot -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batches, epochs, accumulate, cycle_ends", [
    (7, 1, 1, [2, 4, 7]),      # 7 optimizer steps in cycles of 2, 2, 3
    (14, 1, 2, [2, 4, 7]),     # the same 7 steps from 14 micro-batches
    (7, 2, 2, [2, 5, 8]),      # 4 steps per epoch (the last one of an epoch from a single micro-batch)
])
def test_snapshot_members_are_the_weights_after_the_last_optimizer_step_of_each_cycle(batches, epochs, accumulate,
                                                                                      cycle_ends):
    model, make_batch = build("plain")
    method = build_method("snapshot", model, num_members=M)
    record = fit(method, make_batch, batches, epochs, accumulate, lr=0.05)

    steps = cycle_ends[-1]
    assert len(record.weights) == steps
    assert int(method.num_snapshots) == M
    for c, end in enumerate(cycle_ends):  # snapshot c: the weights after step `end` (1-based), bit for bit
        for name, value in record.weights[end - 1].items():
            assert torch.equal(method.snapshots.get_buffer(name)[c], value), f"snapshot {c}: {name}"
    # the lr restarts at the first step of every cycle and falls along a cosine within it
    starts = [0] + cycle_ends[:-1]
    expected = [0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (t - s) / (e - s))).item())
                for s, e in zip(starts, cycle_ends) for t in range(s, e)]
    assert record.lrs == pytest.approx(expected)


# ---- every method ---------------------------------------------------------------------------------------
OPTIONS = {"single_lora": {"r": 2}, "lora_ensemble": {"r": 2}, "mc_dropout": {"dropout": 0.1}}
STEPS = 6  # optimizer steps of every run below: two per snapshot cycle
EVAL_MEMBERS = {"single": 1, "single_lora": 1}


def expected_trainable(name: str, method: nn.Module) -> set[str]:
    """The parameters `name` promises to train: everything for a full fine-tune, else adapters + heads."""
    params = [n for n, _ in method.named_parameters()]
    heads = [f"model.{h}." for h in getattr(method, "head_names", [])]
    if name in ("single", "explicit", "mc_dropout", "snapshot"):
        return set(params)
    if name in ("single_lora", "lora_ensemble"):
        return {n for n in params if n.rsplit(".", 1)[1] in ("lora_A", "lora_B") or n.startswith(tuple(heads))}
    fast = [f"model.{t}.{k}" for t in method.target_names for k in ("r", "s", "bias")]     # batch_ensemble
    return {n for n in params if n in fast or n.startswith(tuple(heads))}


def batch_ensemble_member(method: nn.Module, m: int) -> nn.Module:
    """Member m of a BatchEnsemble alone, from its formula: every fast-weight projection becomes the dense
    nn.Linear with weight W * (s_m r_m^T) and bias b_m, every stacked head member m's head."""
    alone = copy.deepcopy(method.model)
    for name in method.target_names:
        fast = alone.get_submodule(name)
        dense = nn.Linear(fast.in_features, fast.out_features)
        with torch.no_grad():
            dense.weight.copy_(fast.base_layer.weight * torch.outer(fast.s[m], fast.r[m]))
            dense.bias.copy_(fast.bias[m])
        alone.set_submodule(name, dense)
    for name in method.head_names:
        alone.set_submodule(name, member_head(alone.get_submodule(name), m))
    return alone.eval()


def under_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Callable[..., Any]:
    """`model` called with its parameters replaced by `weights`."""
    return lambda *args, **kwargs: functional_call(model, weights, args, kwargs)


def members_alone(name: str, method: nn.Module, record: EveryOptimizerStep) -> list[Callable[..., Any]] | None:
    """Each member as a model of its own, where the method offers a way; None where it has none (MC dropout's
    members are dropout draws)."""
    if name in ("single_lora", "lora_ensemble", "explicit"):
        return [method.member(m).eval() for m in range(method.num_members)]
    if name == "batch_ensemble":
        return [batch_ensemble_member(method, m) for m in range(method.num_members)]
    if name == "snapshot":  # the live model under the weights recorded after each cycle's last step
        ends = method.cycle_ends(STEPS)
        return [under_weights(method.model, record.weights[end - 1]) for end in ends]
    if name == "single":
        return [method.model]
    return None


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trained_by_the_trainer_keeps_its_promises(name):
    model, make_batch = build("bert")
    method = build_method(name, model, num_members=M, **OPTIONS.get(name, {}))
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(name, method)

    record = fit(method, make_batch, batches=STEPS)
    assert len(record.weights) == STEPS
    # what should train changed (every member's own slice of it), the frozen rest is bit-identical
    changed = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    if name in ("lora_ensemble", "explicit", "batch_ensemble"):  # parameters stacked over members (M, ...)
        for n in trainable:
            p = method.get_parameter(n)
            assert all(not torch.equal(p[m], before[n][m]) for m in range(M)), n

    method.eval()
    x = make_batch(B, torch.Generator().manual_seed(99))
    with torch.no_grad():
        out = call(method, x)
        assert out.shape == (EVAL_MEMBERS.get(name, M), B, NUM_LABELS)
        if out.shape[0] > 1:  # independent members predict differently
            assert all((out[a] - out[b]).abs().max() > 1e-4 for a in range(M) for b in range(a))
        alone = members_alone(name, method, record)
        assert (alone is None) == (name == "mc_dropout")  # its members are dropout draws: none runs alone
        if alone is not None:
            assert len(alone) == out.shape[0]
            for m, member in enumerate(alone):  # member m alone gives the ensemble's member m
                torch.testing.assert_close(call(member, x), out[m], atol=1e-5, rtol=1e-4, msg=f"member {m}")
    if name == "snapshot":
        for c, end in enumerate(method.cycle_ends(STEPS)):
            for n, value in record.weights[end - 1].items():
                assert torch.equal(method.snapshots.get_buffer(n)[c], value), f"snapshot {c}: {n}"
