"""Checkpoints that a killed run resumes from exactly: `checkpoints/last.ckpt`, written atomically

    every `training.checkpoint_every_n_steps` optimizer steps (0 = off), at the end of every epoch,
    and when the process receives SIGTERM (SLURM's pre-emption signal) during training.

A checkpoint holds everything that decides what training does next: the trainable tensors and buffers,
the optimizer and the scheduler (Lightning), every RNG (torch CPU, CUDA when present, Python `random`,
numpy; `EnsembleModule.on_save_checkpoint`), the loop counters (Lightning) and the position in the data
order (`ResumableLoader`). A run resumed from it with `--resume` sees the same batches, dropout masks and
learning rates as one that was never stopped, so its final weights and metrics are the same bit for bit.

Mid-epoch, Lightning 2.6 restores only its loop counters: a plain DataLoader starts its epoch again from the
first batch while the counters say k of its N batches are done, so the resumed epoch trains on its first
N - k batches a second time and never on its last k (Lightning warns "your dataloader is not resumable"). A
loader with `state_dict` / `load_state_dict` is saved and restored with the loops; `ResumableLoader` is one:
it records (epoch, batches handed out) and, restored, skips the first k * batch_size indices of that epoch's
order. It also seeds its workers from its own generator, so that starting an epoch draws nothing from the
global torch RNG (a plain DataLoader draws a seed from it on every `iter`, which a resumed run would draw once
more than an uninterrupted one).

Step checkpoints are written after all of a batch's hooks ran (the method's `on_train_batch_end`, e.g.
snapshot ensembles storing a member, runs after the callbacks' hook), just before the next batch is fetched.
Random augmentation in the main process is restored with the RNGs; inside DataLoader workers
(`num_workers > 0`) it restarts from the epoch's worker seed, so exactness then needs deterministic loading.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Sampler

from lora_ensemble.io import atomic_write

CHECKPOINT = os.path.join("checkpoints", "last.ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (truncated, or not a training checkpoint of lora-ensemble)."""


class TrainingStopped(SystemExit):
    """The process was asked to stop (SIGTERM); the message says where the checkpoint is. Uncaught, Python
    prints the message as one line on stderr and exits with status 1."""


# ---- RNG states ---------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """Every global RNG training draws from, as tensors and plain values (loadable with weights_only=True)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state(legacy=False)
    states["numpy"] = {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (entries missing from an older checkpoint are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        s = states["numpy"]
        np.random.set_state({"bit_generator": "MT19937", "state": {"key": s["key"].numpy().astype(np.uint32),
                                                                      "pos": s["pos"]},
                             "has_gauss": s["has_gauss"], "gauss": s["gauss"]})
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the position in the data order -----------------------------------------------------------------
class _SkipSampler(Sampler[int]):
    """`sampler` (an epoch sampler with `epoch` and `set_epoch`) that, once, starts epoch `skip_epoch` at
    index `skip` of its order."""

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.skip_epoch, self.skip = -1, 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip = self.skip if self.sampler.epoch == self.skip_epoch else 0
        self.skip_epoch, self.skip = -1, 0
        return islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch (Lightning saves `state_dict()` in the checkpoint and
    calls `load_state_dict` before the first batch of a resumed run).

    state: {"epoch": e, "batches": k}, the batches of epoch e handed out so far. Restored, the next batch is
    batch k of epoch e's order (or batch 0 of epoch e + 1 when k is the whole epoch). Workers are seeded from
    (seed, epoch) by the loader's own generator, so starting an epoch does not draw from the global RNG."""

    def __init__(self, loader: DataLoader, seed: int):
        if not callable(getattr(loader.sampler, "set_epoch", None)) or not hasattr(loader.sampler, "epoch"):
            raise ValueError(f"ResumableLoader needs an epoch sampler (set_epoch, epoch), got {type(loader.sampler).__name__}")
        workers = loader.num_workers
        super().__init__(loader.dataset, batch_size=loader.batch_size, sampler=_SkipSampler(loader.sampler),
                         collate_fn=loader.collate_fn, num_workers=workers, pin_memory=loader.pin_memory,
                         drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                         multiprocessing_context=loader.multiprocessing_context if workers else None,
                         generator=torch.Generator(), prefetch_factor=loader.prefetch_factor if workers else None,
                         persistent_workers=loader.persistent_workers if workers else False,
                         pin_memory_device=loader.pin_memory_device)
        self.seed = seed
        self._epoch, self._batches = loader.sampler.epoch, 0
        self.before_next: Callable[[], None] | None = None  # called once before the next batch is fetched

    def __iter__(self) -> Iterator[Any]:  # a generator: nothing runs before the first batch is asked for
        sampler = self.sampler
        self.generator.manual_seed(self.seed * 1_000_003 + sampler.epoch)
        self._epoch = sampler.epoch
        self._batches = sampler.skip // self.batch_size if sampler.epoch == sampler.skip_epoch else 0
        batches = super().__iter__()
        while True:
            if self.before_next is not None:
                hook, self.before_next = self.before_next, None
                hook()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "batches": int(self._batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip_epoch, self.sampler.skip = epoch, batches * self.batch_size
        self._epoch, self._batches = epoch, batches


# ---- the callback -----------------------------------------------------------------------------------------
class RunCheckpoint(Checkpoint):
    """Writes `path` (atomically, through the trainer's checkpoint IO) every `every_n_steps` optimizer steps,
    at the end of every epoch, and on SIGTERM; keeps the training time across resumed segments.

    State saved with the checkpoint: `segments_s` (training time of each segment up to this checkpoint),
    `train_time_s` (their sum), `complete` (training had reached `epochs` / `max_steps`, or early stopping ended it)."""

    def __init__(self, path: str, every_n_steps: int = 0, epochs: int = 1, max_steps: int = -1):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.path, self.every_n_steps, self.epochs, self.max_steps = path, every_n_steps, epochs, max_steps
        self.previous_segments_s: list[float] = []  # training time of the segments before this one
        self.saved: dict[str, Any] | None = None     # where the latest checkpoint written by this process stands
        self._segment_start = time.perf_counter()
        self._trainer: L.Trainer | None = None
        self._step_before_batch = 0
        self._stepped = False       # the latest training batch ended with an optimizer step
        self._at_epoch_end = False  # a checkpoint at the end of an epoch is being written
        self._sigterm = False  # this process (or, after an all-reduce, any process) got SIGTERM
        self._lightning_handler: Any = None  # Lightning's SIGTERM handler, replaced during training

    # ---- time ------------------------------------------------------------------------------------------
    def segment_s(self) -> float:
        return time.perf_counter() - self._segment_start

    def train_time_s(self) -> float:
        """Training time of all segments: the earlier ones up to their last checkpoint, and this one."""
        return sum(self.previous_segments_s) + self.segment_s()

    def segments_s(self) -> list[float]:
        return [*self.previous_segments_s, self.segment_s()]

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._segment_start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        segments = self.segments_s()
        return {"train_time_s": sum(segments), "segments_s": segments, "complete": self._complete()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_segments_s = [float(s) for s in state.get("segments_s", [])]

    def _complete(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        epochs_done = trainer.current_epoch + (1 if self._at_epoch_end else 0)  # current_epoch: finished epochs
        stopped_early = self._at_epoch_end and any(  # EarlyStopping ran out of patience at this epoch's validation
            isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience and trainer.should_stop
            for cb in trainer.callbacks)
        return (epochs_done >= self.epochs or stopped_early
                or (self.max_steps > 0 and trainer.global_step >= self.max_steps))

    # ---- when to write ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stepped = trainer.global_step != self._step_before_batch
        last = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= trainer.global_step
        # stop at the end of this batch if any process got SIGTERM, but only after an optimizer step (the
        # gradients accumulated so far are not in a checkpoint) and not at the epoch's last batch (Lightning
        # would stop in the validation that follows; the epoch's end stops instead)
        self._stop_lightning(trainer, self._sigterm_requested(trainer) and self._stepped and not last)
        if not (self.every_n_steps > 0 and self._stepped and trainer.global_step % self.every_n_steps == 0):
            return
        loader = _resumable_loader(trainer)
        if loader is not None:
            # after this batch's remaining hooks (the module's on_train_batch_end runs after the callbacks'),
            # just before the next batch is fetched; an epoch's last batch is covered by the epoch's checkpoint
            loader.before_next = lambda: self._save(trainer, at_epoch_end=False)
        else:  # a plain training loader: a checkpoint now (resumes at the epoch's first batch, as Lightning does)
            self._save(trainer, at_epoch_end=False)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        loader = _resumable_loader(trainer)
        if loader is not None:
            loader.before_next = None  # a step checkpoint due at the epoch's last batch: this one covers it
        self._save(trainer, at_epoch_end=True)
        if self._sigterm_requested(trainer):
            self._stop_lightning(trainer, True)  # Lightning stops right after the epoch

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        loader = _resumable_loader(trainer)
        if loader is not None:
            loader.before_next = None
        self._restore_signal_handler()
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return  # e.g. SIGTERM while testing: the latest checkpoint stands (its state is consistent)
        if self.saved is not None and self.saved["position"] == (trainer.current_epoch, trainer.global_step):
            return  # nothing trained since the latest checkpoint (stopped at the end of an epoch)
        if self._stepped:  # between two batches, after an optimizer step: the state of a step checkpoint
            self._save(trainer, at_epoch_end=False)

    # ---- SIGTERM ---------------------------------------------------------------------------------------
    # Lightning's own handler stops each process at the end of the batch during which it got the signal, and
    # under DDP broadcasts from inside the signal handler, so processes can stop at different batches (one then
    # waits in a collective the other never joins). During training the handler here only records the signal;
    # every process then learns at the same batch end, by one all-reduce, whether any process got it.
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sigterm = bool(getattr(trainer, "received_sigterm", False))
        if threading.current_thread() is not threading.main_thread():
            return
        connector = getattr(trainer, "_signal_connector", None)
        before = getattr(connector, "_original_handlers", {}).get(signal.SIGTERM)  # the handler before Lightning's
        self._lightning_handler = signal.getsignal(signal.SIGTERM)

        def record(signum: int, frame: Any) -> None:
            self._sigterm = True
            if callable(before):
                before(signum, frame)

        signal.signal(signal.SIGTERM, record)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_signal_handler()

    def _restore_signal_handler(self) -> None:
        if self._lightning_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._lightning_handler)
        self._lightning_handler = None

    def _sigterm_requested(self, trainer: L.Trainer) -> bool:
        """Whether any process got SIGTERM; the same answer on every process (one all-reduce under DDP)."""
        if trainer.world_size > 1:
            flag = torch.tensor(1.0 if self._sigterm else 0.0, device=trainer.strategy.root_device)
            self._sigterm = bool(trainer.strategy.reduce(flag, reduce_op="max").item() > 0)
        return self._sigterm

    @staticmethod
    def _stop_lightning(trainer: L.Trainer, stop: bool) -> None:
        """Set the flag on which Lightning's loops stop (raise SIGTERMException) at the end of this batch/epoch."""
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "received_sigterm"):
            connector.received_sigterm = stop

    def _save(self, trainer: L.Trainer, at_epoch_end: bool) -> None:
        self._at_epoch_end = at_epoch_end
        try:
            trainer.save_checkpoint(self.path)
        finally:
            self._at_epoch_end = False
        epoch = trainer.current_epoch  # 0-based epoch being trained (at its end: the one that ends)
        self.saved = {"position": (epoch + 1 if at_epoch_end else epoch, trainer.global_step),
                      "where": f"{'at the end' if at_epoch_end else 'in the middle'} of epoch {epoch + 1}, "
                               f"after {trainer.global_step} optimizer steps"}
        if trainer.is_global_zero:
            for stale in glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(self.path))), ".tmp-*" + glob.escape(os.path.basename(self.path)))):  # left by a process killed while writing
                with contextlib.suppress(OSError):
                    os.unlink(stale)

    def stop_message(self, signal_name: str = "SIGTERM") -> str:
        """One line: where the checkpoint is and how to continue."""
        if self.saved is None and not os.path.isfile(self.path):
            return f"stopped by {signal_name} before the first checkpoint was written; there is nothing to resume"
        where = f" ({self.saved['where']})" if self.saved is not None else " (written before this segment)"
        return (f"stopped by {signal_name}: checkpoint {self.path}{where}; "
                "continue with the same `lora-ensemble fit` command and --resume")


def _resumable_loader(trainer: L.Trainer) -> ResumableLoader | None:
    combined = trainer.fit_loop._combined_loader
    loaders = combined.flattened if combined is not None else []
    return next((dl for dl in loaders if isinstance(dl, ResumableLoader)), None)


# ---- reading a checkpoint before resuming ------------------------------------------------------------------
def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at `path` as Lightning will load it; CheckpointError if it is truncated or not a checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling error ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"--resume: {path} is not a readable checkpoint ({reason}); it may have been cut short "
                          "or overwritten: delete it to train from the start") from None
    missing = [k for k in ("state_dict", "loops", "optimizer_states") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a training checkpoint of lora-ensemble (missing {missing})")
    return checkpoint


def training_complete(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint was written when training had reached its end (all epochs / max_steps). A
    checkpoint without RunCheckpoint's state is from an older version, which wrote one only at the end."""
    state = checkpoint.get("callbacks", {}).get(RunCheckpoint.__qualname__)
    return True if state is None else bool(state.get("complete", False))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it, so a killed run never
    leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)
