"""Every method trained through Lightning's `Trainer.fit`, as `lora-ensemble fit` trains it, then its members checked."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from tiny_models import NUM_LABELS, build
from torch.utils.data import DataLoader, Dataset

from lora_ensemble.methods import build_method
from lora_ensemble.training import EnsembleModule

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
