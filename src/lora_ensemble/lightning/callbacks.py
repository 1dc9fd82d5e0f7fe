"""What `fit` shows while it trains: a progress bar on a terminal, one line per epoch otherwise.

    epoch 2/4  train/loss 1.2034  val/acc 0.6250  val/nll 1.0412  val/ece 0.0931  3.1 s

A log file or a cluster job's output (stdout not a terminal) gets the epoch lines, flushed as they are
written; a terminal gets Lightning's bar, which counts epochs from 1 ("Epoch 4/4", not "Epoch 3" of 4).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

VAL_KEYS = ("acc", "nll", "ece")


class EpochLog(L.Callback):
    """Prints `epoch i/N`, the mean training loss of the epoch, the validation metrics of that epoch (when it
    validated) and its wall time, on the main process."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self._start, self._losses, self._validated = 0.0, [], False

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start, self._losses, self._validated = time.perf_counter(), [], False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._losses.append(float(loss))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{total}"]
        if self._losses:
            parts.append(f"train/loss {sum(self._losses) / len(self._losses):.4f}")
        if self._validated:
            metrics = trainer.callback_metrics
            parts += [f"val/{k} {float(metrics[f'val/{k}']):.4f}" for k in VAL_KEYS if f"val/{k}" in metrics]
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar with the epoch counted from 1 and out of the total: `Epoch 4/4`."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}{total}")


def has_bar(callbacks: list[L.Callback]) -> bool:
    return any(isinstance(c, TQDMProgressBar) for c in callbacks)


def progress_callbacks(progress_bar: bool) -> list[L.Callback]:
    """The bar when asked for and stdout is a terminal, else the epoch lines."""
    if progress_bar and sys.stdout.isatty():
        return [EpochProgressBar()]
    return [EpochLog()]


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


class BestValidation(L.Callback):
    """Keeps the trainable state (trainable parameters and buffers, `EnsembleModule.trainable_state`) of the
    validation with the lowest `monitor` (val/nll by default) and puts it back with `restore`.

    After every validation of training (sanity checks excluded) with value v_e at epoch e (1-based):
        best = min_e v_e (the first epoch reaching it on ties), best_epoch = its e, history = [v_1, v_2, ...]
    The copy lives on the CPU; `state_dict` carries it (with best, best_epoch and history), so a run resumed
    from a checkpoint still restores the best epoch seen before the stop."""

    def __init__(self, monitor: str = "val/nll") -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.history: list[float] = []
        self.best_metrics: dict[str, float] = {}  # every val/* scalar of the best validation
        self._state: dict[str, Any] | None = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":  # not a separate trainer.validate()
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        self.history.append(value)
        if self.best is None or value < self.best:  # NaN never compares lower: a NaN epoch is never the best
            self.best, self.best_epoch = value, trainer.current_epoch + 1
            self.best_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in module.trainable_state().items()}

    def restore(self, module: L.LightningModule) -> bool:
        """Load the best epoch's state into `module`; False when no validation has run."""
        if self._state is None:
            return False
        device = next(iter(module.parameters())).device
        module.load_state_dict({k: v.to(device) for k, v in self._state.items()}, strict=False)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "history": list(self.history),
                "best_metrics": dict(self.best_metrics), "state": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.history = list(state.get("history", []))
        self.best_metrics = dict(state.get("best_metrics", {}))
        self._state = state.get("state")
