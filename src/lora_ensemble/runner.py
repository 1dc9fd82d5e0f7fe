"""A run, top to bottom: config -> data -> model -> method -> Lightning fit -> test metrics -> files.

    run_dir/
      run_config.yaml            the resolved config (what `evaluate` / `predict` rebuild from)
      checkpoints/last.ckpt      Lightning checkpoints (trainable tensors only; `--resume` continues from last)
      model/weights.safetensors  the trained method's trainable tensors and buffers, by name
      results.json               test metrics (in-distribution and OOD), timings, parameter counts
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import yaml
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .config import atomic_write_bytes
from .data import DatasetSplits, load_dataset
from .methods import accepts_option, build_method
from .metrics import fit_temperature
from .models import build_model
from .run_config import ConfigError, RunConfig, load_run_config
from .ensemble import LoraEnsemble
from .training import (AtomicCheckpointIO, EnsembleModule, EpochShuffleSampler, EpochTimer, EvaluationSampler,
                       IndexedDataset, WithSampleIds)
from .trunk import TrunkCache

CONFIG_FILE = "run_config.yaml"
WEIGHTS_FILE = os.path.join("model", "weights.safetensors")


@dataclass
class Run:
    """Everything a run is made of, built from a RunConfig."""

    config: RunConfig
    splits: DatasetSplits
    collate: Any
    module: EnsembleModule

    def loader(self, split: str, shuffle: bool = False, world_size: int = 1, rank: int = 0) -> DataLoader | None:
        dataset = self.splits.split(split) if split != "ood" else self.splits.ood
        if dataset is None or len(dataset) == 0:
            return None
        d = self.config.data
        if split == "train":  # padded under DDP: every process runs the same number of steps
            sampler: Sampler[int] = EpochShuffleSampler(len(dataset), seed=self.config.seed, shuffle=shuffle,
                                                        num_replicas=world_size, rank=rank)
        else:  # every sample exactly once across the processes, gathered back in dataset order
            try:
                sampler = EvaluationSampler(len(dataset), num_replicas=world_size, rank=rank)
            except ValueError as e:
                raise ConfigError(f"data: the {split} split: {e}") from None
        batch_size = d.batch_size if shuffle else (d.eval_batch_size or d.batch_size)
        collate = self.collate
        if split == "train" and self.module.trunk_cache is not None:  # batches name their samples for the cache
            dataset, collate = IndexedDataset(dataset), WithSampleIds(collate)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=d.num_workers)


def build_run(config: RunConfig) -> Run:
    """Load data, build the model and the method, wrap them in the training module."""
    L.seed_everything(config.seed, verbose=False)
    try:
        splits = load_dataset(config.data.name, **config.data.options)
    except TypeError as e:  # unknown / missing loader arguments
        raise ConfigError(f"data: {e}") from None
    model, collate = build_model(config.model, splits.num_classes, splits.modality, splits.sample_rate)
    options = dict(config.method.options)
    if accepts_option(config.method.name, "seed"):
        options.setdefault("seed", config.seed)
    try:
        method = build_method(config.method.name, model, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method: {e}") from None
    t = config.training
    weights = splits.class_weights().tolist() if t.class_weights else None
    trunk_cache = None
    if t.cache_trunk:
        if not isinstance(method, LoraEnsemble):
            raise ConfigError(f"training.cache_trunk: method {config.method.name!r} has no frozen trunk to cache; "
                              "use lora_ensemble or single_lora with share_trunk: true and layers")
        try:
            trunk_cache = TrunkCache(method)
        except ValueError as e:
            raise ConfigError(f"training.cache_trunk: {e}") from None
    module = EnsembleModule(method, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                            loss_reduction=t.loss_reduction, class_weights=weights, trunk_cache=trunk_cache)
    return Run(config, splits, collate, module)


def make_trainer(config: RunConfig, run_dir: str | None, max_epochs: int | None = None) -> L.Trainer:
    t = config.training
    callbacks: list[L.Callback] = [EpochTimer()]
    if run_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"),
                                                             save_last=True, save_top_k=0, every_n_epochs=1))
    return L.Trainer(
        max_epochs=max_epochs or t.epochs, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.accumulate_grad_batches, precision=t.precision, accelerator=t.accelerator,
        devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs") if run_dir else False,
        enable_checkpointing=run_dir is not None, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=run_dir,
        inference_mode=False,  # no_grad instead: tensors keep version counters, which the shared trunk checks
        check_val_every_n_epoch=t.val_every_n_epochs,
    )


def total_steps(config: RunConfig, train_size: int, world_size: int = 1) -> int:
    """Optimizer steps of the whole run, from the config alone (not from a trainer that may have been
    started with fewer epochs), so a resumed run follows the same learning-rate schedule."""
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(math.ceil(train_size / world_size) / config.data.batch_size)
    return t.epochs * max(1, math.ceil(batches / t.accumulate_grad_batches))


def fit(config: RunConfig, run_dir: str, resume: bool = False, max_epochs: int | None = None
        ) -> tuple[dict[str, Any], Run]:
    """Train, evaluate on the test (and OOD) split, write the run folder; returns (results.json's content,
    the Run with the trained module)."""
    os.makedirs(run_dir, exist_ok=True)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if resume and not os.path.isfile(last):
        raise ConfigError(f"--resume: no checkpoint at {last}")
    saved = os.path.join(run_dir, CONFIG_FILE)
    if resume and os.path.isfile(saved):
        previous = load_run_config(saved)
        if previous.to_dict() != config.to_dict():
            raise ConfigError(f"--resume: the config differs from the one the run in {run_dir} started with")
    atomic_write_bytes(saved, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())

    run = build_run(config)
    trainer = make_trainer(config, run_dir, max_epochs)
    ws, rank = trainer.world_size, trainer.global_rank
    run.module.total_steps = total_steps(config, len(run.splits.train), ws)
    start = time.perf_counter()
    trainer.fit(run.module, run.loader("train", shuffle=True, world_size=ws, rank=rank),
                run.loader("val", world_size=ws, rank=rank), ckpt_path=last if resume else None)
    train_time = time.perf_counter() - start
    if config.training.temperature_scaling:
        calibrate(run, trainer)
    results = test(run, trainer)
    from .diagnostics import collapse_warning  # one line on stderr when the predictions are all one class

    logits, labels, _ = run.module.last_outputs["test"]
    results["prediction_collapse"] = collapse_warning(logits, labels, run.splits.class_names,
                                                      warn=trainer.is_global_zero)
    timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
    results.update(train_time_s=train_time, train_epoch_times_s=timer.epoch_times_s,
                   **parameter_counts(run.module.method))
    cache = run.module.trunk_cache
    if cache is not None:
        results["trunk_cache"] = {"computed_batches": cache.computed_batches, "replayed_batches": cache.replayed_batches,
                                  "samples": len(cache), "bytes": cache.nbytes}
    if trainer.is_global_zero:
        write_weights(run.module, os.path.join(run_dir, WEIGHTS_FILE))
        atomic_write_bytes(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2).encode())
    return results, run


def test(run: Run, trainer: L.Trainer) -> dict[str, Any]:
    """Test metrics (+ OOD metrics when the data has an OOD split) and inference time per sample."""
    ws, rank = trainer.world_size, trainer.global_rank
    loaders = [run.loader("test", world_size=ws, rank=rank)]
    ood = run.loader("ood", world_size=ws, rank=rank)
    if ood is not None:
        loaders.append(ood)
    start = time.perf_counter()
    trainer.test(run.module, loaders, verbose=False)
    elapsed = time.perf_counter() - start
    n = len(run.splits.test) + (len(run.splits.ood) if run.splits.ood is not None else 0)
    return {"metrics": run.module.last_metrics["test"], "inference_time_per_sample_s": elapsed / max(1, n),
            "temperature": run.module.temperature}


def calibrate(run: Run, trainer: L.Trainer) -> None:
    """Fit one temperature on the validation split (NLL of the ensemble predictive) and use it from now on."""
    trainer.validate(run.module, run.loader("val", world_size=trainer.world_size, rank=trainer.global_rank),
                     verbose=False)
    logits, labels, _ = run.module.last_outputs["val"]
    run.module.temperature = fit_temperature(logits, labels, mode="members")


def parameter_counts(method: nn.Module) -> dict[str, int]:
    """Trainable parameters and everything held in memory (parameters + buffers), counted once each."""
    params = {id(p): p for p in method.parameters()}
    buffers = {id(b): b for b in method.buffers()}
    return {
        "trainable_parameters": sum(p.numel() for p in params.values() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params.values()),
        "bytes_in_memory": sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()]),
    }


def write_weights(module: EnsembleModule, path: str) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.trainable_state().items()}
    meta = {"temperature": str(module.temperature)}
    atomic_write_bytes(path, save(tensors, meta))


def load_run(run_dir: str, overrides: list[str] | None = None) -> Run:
    """Rebuild a finished run from its folder (run_config.yaml + model/weights.safetensors)."""
    config_path, weights_path = os.path.join(run_dir, CONFIG_FILE), os.path.join(run_dir, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} not found: --checkpoint must be a run folder written by `lora-ensemble fit`")
    run = build_run(load_run_config(config_path, overrides))
    tensors = load_file(weights_path)
    expected = run.module.trainable_state()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise ConfigError(f"{weights_path} does not fit the model built from {config_path}")
    run.module.load_state_dict(tensors, strict=False)
    from safetensors import safe_open

    with safe_open(weights_path, "pt") as f:
        run.module.temperature = float((f.metadata() or {}).get("temperature", 1.0))
    return run
