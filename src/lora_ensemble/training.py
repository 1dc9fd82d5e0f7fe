"""Training on PyTorch Lightning: one LightningModule for every method that returns member logits.

Lightning brings the loop, progress bars, checkpointing, mixed precision, gradient accumulation and
DDP/FSDP; this module adds only what is specific to ensembles:

    loss = 1/M sum_m CE(z_m, y)        (the paper; `loss_reduction="sum"` gives sum_m CE(z_m, y))
    z: member logits (M, B, C) from `method(**inputs)`, y: labels (B,)

AdamW over the trainable parameters, linear warm-up then cosine decay per step (or the method's own
`lr_lambda(total_steps)` hook, e.g. snapshot ensembles' cycles), validation/test metrics from
`lora_ensemble.metrics.evaluate`, and checkpoints that hold only trainable tensors and buffers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from .checkpointing import rng_states, set_rng_states
from .metrics import evaluate
from .trunk import TrunkCache

LABELS = "labels"
SAMPLE_IDS = "sample_ids"  # (B,) training-set indices, in batches of a run with a trunk cache


def member_cross_entropy(member_logits: Tensor, labels: Tensor, reduction: str = "mean",
                         class_weights: Tensor | None = None) -> Tensor:
    """Mean (or sum) over members of each member's cross-entropy.

    member_logits: (M, B, C); labels: (B,). With class weights, each member's CE is the weighted mean
    sum_i w_{y_i} CE_i / sum_i w_{y_i}, as `F.cross_entropy(weight=...)`.
    """
    if member_logits.dim() != 3:
        raise ValueError(f"member logits must have shape (M, B, C), got {tuple(member_logits.shape)}")
    M, B, C = member_logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match member logits {tuple(member_logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    weight = None if class_weights is None else class_weights.to(member_logits.device, torch.float32)
    ce = F.cross_entropy(member_logits.reshape(M * B, C).float(), labels.repeat(M), weight=weight,
                         reduction="none").view(M, B)                           # (M, B), already weighted
    norm = B if weight is None else weight[labels].sum()                        # each member's weight total
    per_member = ce.sum(dim=1) / norm                                           # (M,)
    return per_member.mean() if reduction == "mean" else per_member.sum()


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup_steps`, then cosine down to `min_factor`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EnsembleModule(L.LightningModule):
    """Trains and evaluates `method`, any nn.Module whose forward(**inputs) returns member logits (M, B, C).

    Batches are dicts of model inputs plus `labels` (and `sample_ids` when training with a `trunk_cache`,
    which then runs the training forward so that later epochs skip the frozen trunk; see `trunk.py`).
    Validation/test on dataloader 0 are in-distribution;
    a second test dataloader is treated as out-of-distribution (its labels are ignored) and adds the
    `ood/*` metrics. Logged keys are `val/<metric>` and `test/<metric>` with the keys of `evaluate`.
    Under DDP the predictions of all processes are gathered before the metrics are computed; with evaluation
    loaders on `EvaluationSampler` (as `Run.loader` builds them), `last_outputs` then holds every sample
    exactly once, in dataset order.
    """

    def __init__(self, method: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 loss_reduction: str = "mean", class_weights: list[float] | None = None, n_bins: int = 15,
                 total_steps: int | None = None, trunk_cache: TrunkCache | None = None):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.method = method
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.loss_reduction, self.n_bins, self.total_steps = loss_reduction, n_bins, total_steps
        self.register_buffer("class_weights", None if class_weights is None else torch.tensor(class_weights),
                             persistent=False)
        self.frozen_names = {n for n, p in self.named_parameters() if not p.requires_grad}
        self.strict_loading = False  # checkpoints hold trainable tensors only; see on_load_checkpoint
        self._outputs: dict[str, list[list[tuple[Tensor, Tensor]]]] = {}
        self.last_metrics: dict[str, dict[str, Any]] = {}
        self.last_outputs: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        self.temperature = 1.0  # evaluation divides member logits by it (post-hoc temperature scaling)
        if trunk_cache is not None and trunk_cache.ensemble is not method:
            raise ValueError("trunk_cache must cache the trunk of the method being trained")
        self.trunk_cache = trunk_cache
        self._steps_before_batch = 0  # global_step when the current training batch started

    def on_fit_start(self) -> None:
        # Lightning keeps each submodule's mode; a Hugging Face model comes out of from_pretrained in eval
        # mode, so switch everything to training mode (dropout, MC dropout) for fitting.
        self.train()

    # ---- steps --------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.method(**model_inputs(batch))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if self.trunk_cache is not None:
            if SAMPLE_IDS not in batch:
                raise ValueError(f"training with a trunk cache needs `{SAMPLE_IDS}` in every batch (see WithSampleIds)")
            member_logits = self.trunk_cache(batch[SAMPLE_IDS], **model_inputs(batch))
        else:
            member_logits = self(batch)
        loss = member_cross_entropy(member_logits, batch[LABELS], self.loss_reduction, self.class_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[LABELS]))
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._steps_before_batch = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning calls this after every micro-batch, with `global_step` already counting the optimizer step
        # this batch completed, if any. The method's hook runs once per optimizer step, with the 0-based index
        # t of the step just done: the t whose learning rate the LambdaLR schedule gave (lr_lambda(t)).
        if self.global_step == self._steps_before_batch:
            return  # gradients accumulated, no optimizer step
        hook = getattr(self.method, "on_train_batch_end", None)
        if callable(hook):
            hook(self.global_step - 1, self._total_steps())

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect("test", batch, dataloader_idx)

    def _collect(self, stage: str, batch: Mapping[str, Tensor], dataloader_idx: int) -> None:
        logits = self(batch).float() / self.temperature
        store = self._outputs.setdefault(stage, [[], []])
        store[min(dataloader_idx, 1)].append((logits.detach().cpu(), batch[LABELS].detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        in_dist, ood = self._outputs.pop(stage, [[], []])
        if not in_dist or self.trainer.sanity_checking:
            return
        logits = self.all_gather_cat([z for z, _ in in_dist], dim=1)
        labels = self.all_gather_cat([y for _, y in in_dist], dim=0)
        ood_logits = self.all_gather_cat([z for z, _ in ood], dim=1) if ood else None
        metrics = evaluate(logits, labels, ood_logits, n_bins=self.n_bins)
        self.last_metrics[stage] = metrics
        self.last_outputs[stage] = (logits, labels, ood_logits)
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if not isinstance(v, list)}
        self.log_dict(scalars, prog_bar=False, sync_dist=False, rank_zero_only=True)
        self.log(f"{stage}/acc_", metrics["acc"], prog_bar=True, logger=False, rank_zero_only=True)  # bar only

    def all_gather_cat(self, parts: list[Tensor], dim: int) -> Tensor:
        """This process's parts concatenated along `dim`; under DDP, every process's, in rank order.

        Processes may hold different numbers of rows n_r along `dim` (evaluation shards are not padded, see
        `EvaluationSampler`): the counts are gathered first, every process pads its rows to max_r n_r, and
        each process's padding is cut off again after the gather."""
        local = torch.cat(parts, dim=dim)
        if self.trainer.world_size <= 1:
            return local
        counts = self.all_gather(torch.tensor([local.shape[dim]], device=self.device)).view(-1).tolist()
        padding = list(local.shape)
        padding[dim] = max(counts) - local.shape[dim]
        padded = torch.cat([local, local.new_zeros(padding)], dim=dim)
        gathered = self.all_gather(padded.to(self.device)).cpu()                    # (world, ..., max n_r, ...)
        return torch.cat([g.narrow(dim, 0, n) for g, n in zip(gathered, counts)], dim=dim)

    # ---- optimisation -------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the method has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        hook = getattr(self.method, "lr_lambda", None)
        schedule = hook(self._total_steps()) if callable(hook) else None
        if schedule is None:
            schedule = warmup_cosine(self._total_steps(), self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: trainable tensors (+ buffers) and the RNG state, nothing frozen ------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in self.frozen_names}
        checkpoint["rng_state"] = rng_states()  # torch CPU, CUDA, Python, numpy: dropout masks continue exactly

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {k for k in self.state_dict() if k not in self.frozen_names}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        unexpected = sorted(set(checkpoint["state_dict"]) - set(self.state_dict()))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if "rng_state" in checkpoint:
            set_rng_states(checkpoint["rng_state"])

    def trainable_state(self) -> dict[str, Tensor]:
        """Everything a checkpoint of this module holds: trainable parameters and buffers, by name."""
        return {k: v for k, v in self.state_dict().items() if k not in self.frozen_names}


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword inputs: the batch without `labels` and `sample_ids`."""
    return {k: v for k, v in batch.items() if k not in (LABELS, SAMPLE_IDS)}


class IndexedDataset(Dataset):
    """`dataset[i]` as `(i, dataset[i])`, so that batches can name their samples (for `WithSampleIds`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class WithSampleIds:
    """A collate function over `IndexedDataset` items: `collate(items)` plus `sample_ids: (B,)` int64."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Tensor]]):
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Tensor]:
        batch = self.collate([item for _, item in items])
        if SAMPLE_IDS in batch:
            raise ValueError(f"the collate function already makes a `{SAMPLE_IDS}` entry")
        return {**batch, SAMPLE_IDS: torch.tensor([index for index, _ in items], dtype=torch.long)}


class EpochTimer(L.Callback):
    """Wall time of each training epoch, from its start to the end of its last training batch (validation
    excluded), in `epoch_times_s`."""

    def __init__(self) -> None:
        self.epoch_times_s: list[float] = []
        self._start = self._last = 0.0
        self._resumed_s = 0.0  # time the epoch resumed in the middle had before the stop

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_times_s.append(self._last - self._start)
        self._start = self._last  # nothing of the next epoch done yet (what a checkpoint now records)

    # a resumed run continues the list; an epoch resumed in the middle adds the time it had before the stop
    def state_dict(self) -> dict[str, Any]:
        return {"epoch_times_s": list(self.epoch_times_s), "epoch_so_far_s": self._last - self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_times_s = [float(t) for t in state.get("epoch_times_s", [])]
        self._resumed_s = float(state.get("epoch_so_far_s", 0.0))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning does not call on_train_epoch_start for an epoch resumed in the middle
        now = time.perf_counter()
        self._start, self._last = now - self._resumed_s, now


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it, so a killed run never
    leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not reach the disk before the data (a node that dies)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch) alone, so a resumed run sees the same order
    as an uninterrupted one. Lightning calls `set_epoch` before every epoch. Under DDP each of the
    `num_replicas` processes takes every num_replicas-th index, padded to equal length by repeating the first
    indices (every process must run the same number of training steps). For training only: evaluation uses
    `EvaluationSampler`, which counts every sample once."""

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.length))
        per_replica = math.ceil(self.length / self.num_replicas)
        order += order[: per_replica * self.num_replicas - len(order)]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)


class EvaluationSampler(Sampler[int]):
    """Evaluation order without padding: process r of W takes the contiguous block [r N // W, (r+1) N // W)
    of the N samples, in order (blocks differ in length by at most one). Concatenating the blocks in rank
    order, as `EnsembleModule.all_gather_cat` does, gives every sample exactly once, in dataset order."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1} for num_replicas={num_replicas}, got {rank}")
        if length < num_replicas:
            raise ValueError(f"an evaluation split of {length} sample(s) cannot be shared by {num_replicas} "
                             f"processes (each needs at least one); use at least {num_replicas} samples or fewer devices")
        self.start, self.stop = rank * length // num_replicas, (rank + 1) * length // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
