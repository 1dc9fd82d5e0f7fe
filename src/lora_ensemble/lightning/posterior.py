"""`PosteriorCallback`: a posterior over the members of the ensemble being trained (see lora_ensemble.posterior).

    trainer = L.Trainer(callbacks=[PosteriorCallback("swag", rank=5, start_epoch=1, path="runs/x/posterior")])

method="swag": `collect()` at the end of every training epoch e (0-based) with e >= start_epoch, or, with
`collect_every_n_steps` = n > 0, after every optimizer step t (1-based, global) with t % n == 0 during those
epochs (steps that only accumulate gradients never collect). The moments travel in Lightning's checkpoints
(`state_dict`), so a resumed run continues the same collection.
`swa_lr` (swag only, default None: the run's own schedule throughout): from the first optimizer step of epoch
`start_epoch` on, the learning rate is held at `swa_lr`, the constant-rate phase of SWA/SWAG (Izmailov et al.
2018, Maddox et al. 2019), in which the iterates move around the mode the first phase reached instead of
freezing as a decaying schedule ends (the moments of a decayed schedule describe almost no spread). Step t
(optimizer steps done, 0-based) gets lr_base * schedule(t) for t < start_epoch * steps_per_epoch, then swa_lr:
the run's LambdaLR multipliers are wrapped at train start, the same way on a resumed run.
`include_heads` (swag only): False puts the Gaussian on the adapters alone (see LoraPosterior).
method="tfb": nothing during training; at the end, `calibrate()` on the trainer's first validation loader
(the anchor set; never the test split) with `max_nll_increase`.
At the end of training (`on_train_end`), when the trainer has a `BestValidation` callback (early stopping),
its best validation epoch's weights are put back first: TFB calibrates sigma around the weights that are
then tested, and the saved ensemble is that epoch's (the same tensors as the run's model/weights.safetensors),
not the last epoch's. Then the posterior is written to `path` (when given) by the main process, with
`LoraPosterior.save_pretrained` (the ensemble, and the moments or sigma). `partial=True` marks a fit that stops
before the run's planned epochs to be resumed later (`runner.fit(max_epochs=...)`): unless early stopping ended
it, its end writes nothing (the moments travel in its checkpoint; the fit that finishes writes the posterior).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.lightning.callbacks import BestValidation
from lora_ensemble.posterior import POSTERIOR_METHODS, LoraPosterior
from lora_ensemble.posterior.posterior import resolve_include_heads


class PosteriorCallback(L.Callback):
    """Builds a `LoraPosterior` over `module.method` (a LoraEnsemble) and collects / calibrates it."""

    def __init__(self, method: str = "swag", rank: int = 5, start_epoch: int = 0, collect_every_n_steps: int = 0,
                 path: str | None = None, max_nll_increase: float = 0.003, swa_lr: float | None = None,
                 include_heads: bool | None = None, partial: bool = False) -> None:
        if method not in POSTERIOR_METHODS:
            raise ValueError(f"unknown posterior method {method!r}; methods: {list(POSTERIOR_METHODS)}")
        if swa_lr is not None and (method != "swag" or isinstance(swa_lr, bool)
                                   or not isinstance(swa_lr, (int, float)) or not swa_lr > 0):
            raise ValueError(f"swa_lr is the constant learning rate of SWAG's collection phase: a number > 0 with "
                             f"method 'swag', got {swa_lr!r} with method {method!r}")
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        for name, value in (("start_epoch", start_epoch), ("collect_every_n_steps", collect_every_n_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.include_heads = resolve_include_heads(method, include_heads)  # at construction, not first at setup
        self.method, self.rank, self.path = method, rank, path
        self.start_epoch, self.every = start_epoch, collect_every_n_steps
        self.max_nll_increase, self.partial = max_nll_increase, partial
        self.posterior: LoraPosterior | None = None
        self._pending: dict[str, Any] | None = None  # moments from a checkpoint, applied once the posterior exists
        self._steps_before_batch = 0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.posterior is not None:
            return
        ensemble = getattr(module, "method", module)
        if not isinstance(ensemble, LoraEnsemble):
            raise TypeError(f"a posterior is over the members of a LoraEnsemble (methods lora_ensemble, single_lora); "
                            f"this module trains a {type(ensemble).__name__}")
        self.posterior = LoraPosterior(ensemble, self.method, self.rank, self.include_heads)

    def _collecting(self, trainer: L.Trainer) -> bool:
        return self.method == "swag" and trainer.current_epoch >= self.start_epoch

    def _hold_swa_lr(self, trainer: L.Trainer) -> None:
        """Wrap the LambdaLR multipliers: f(t) before the collection's first step, swa_lr / lr_base after."""
        start = self.start_epoch * math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise TypeError(f"swa_lr holds the learning rate of a LambdaLR schedule; this run's scheduler is a "
                                 f"{type(scheduler).__name__}")
            scheduler.lr_lambdas = [
                (lambda t, f=f, base=base: f(t) if t < start else self.swa_lr / base)
                for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
            if scheduler.last_epoch >= start:  # resumed inside the collection phase: the step about to run
                for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
                    group["lr"] = lr

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.swa_lr is not None:
            self._hold_swa_lr(trainer)
        if self._pending is not None:  # a resumed run: the moments collected before the stop
            params = self.posterior.swag_tensors()
            device = next(iter(params.values())).device
            self.posterior.swag.load_state(self._pending["tensors"], self._pending["counters"],
                                           {n: p.shape for n, p in params.items()}, device, "the checkpoint")
            self._pending = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self._steps_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        stepped = trainer.global_step != self._steps_before_batch
        if self.every and stepped and trainer.global_step % self.every == 0 and self._collecting(trainer):
            self.posterior.collect()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.every and self._collecting(trainer):
            self.posterior.collect()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        post = self.posterior
        if post is None or (self.partial and not trainer.should_stop):  # to be resumed: the last fit writes it
            return
        best = next((c for c in trainer.callbacks if isinstance(c, BestValidation)), None)
        if best is not None:  # the weights that will be tested (fit restores them too; restoring twice is a no-op)
            best.restore(module)
        if self.method == "tfb":
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if loader is None:
                raise ValueError("posterior method 'tfb' calibrates on the validation loader, and this fit has none")
            post.calibrate(loader, self.max_nll_increase)
        if self.path is not None and trainer.is_global_zero:
            if self.method == "swag" and post.num_collected == 0:
                raise ValueError(f"the SWAG posterior collected nothing: training ended before epoch "
                                 f"{self.start_epoch + 1} (start_epoch {self.start_epoch}) or before step "
                                 f"{self.every} (collect_every_n_steps)")
            post.save_pretrained(self.path)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.posterior is None:
            return {}
        tensors, counters = self.posterior.swag.state()
        return {"tensors": {n: t.detach().cpu() for n, t in tensors.items()}, "counters": counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("counters", {}).get("num_collected", 0):
            self._pending = state
