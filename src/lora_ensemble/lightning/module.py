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
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lora_ensemble.core.trunk_cache import TrunkCache
from lora_ensemble.lightning.checkpointing import rng_states, set_rng_states
from lora_ensemble.lightning.samplers import SAMPLE_IDS
from lora_ensemble.losses import LABELS, member_cross_entropy
from lora_ensemble.metrics import evaluate


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


