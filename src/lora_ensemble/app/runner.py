"""A run, top to bottom: config -> data -> model -> method -> Lightning fit -> test metrics -> files.

    run_dir/
      run_config.yaml            the resolved config (what `evaluate` / `predict` rebuild from)
      run_info.json              class names, modality, preprocessing: `predict` needs no data set (see run_info)
      checkpoints/last.ckpt      Lightning checkpoints (trainable tensors only; `--resume` continues from last)
      model/weights.safetensors  the trained method's trainable tensors and buffers, by name
      results.json               test metrics (in-distribution and OOD), timings, parameter counts
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lora_ensemble.app.builders import build_model
from lora_ensemble.app.data import DatasetSplits, load_dataset
from lora_ensemble.app.launch import launch_rank
from lora_ensemble.app.run_config import ConfigError, RunConfig, load_run_config
from lora_ensemble.app.run_info import INFO_FILE, RunInfo, read_run_info
from lora_ensemble.core.config import LoraEnsembleConfig
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.core.trunk_cache import TrunkCache
from lora_ensemble.io import atomic_write_bytes
from lora_ensemble.lightning.callbacks import BestValidation, EpochTimer, has_bar, progress_callbacks
from lora_ensemble.lightning.checkpointing import (
    CHECKPOINT,
    AtomicCheckpointIO,
    ResumableLoader,
    RunCheckpoint,
    TrainingStopped,
    read_checkpoint,
    training_complete,
)
from lora_ensemble.lightning.module import EnsembleModule
from lora_ensemble.lightning.samplers import EpochShuffleSampler, EvaluationSampler, IndexedDataset, WithSampleIds
from lora_ensemble.methods import METHODS, accepts_option, build_method
from lora_ensemble.methods.lora import CONFIG_FIELDS as LORA_FIELDS
from lora_ensemble.metrics import fit_temperature

CONFIG_FILE = "run_config.yaml"
VAL_MONITOR = "val/nll"  # what early stopping watches and the best epoch minimises
WEIGHTS_FILE = os.path.join("model", "weights.safetensors")
POSTERIOR_DIR = "posterior"  # LoraPosterior.save_pretrained of training.posterior


@dataclass
class Run:
    """Everything a run is made of, built from a RunConfig."""

    config: RunConfig
    splits: DatasetSplits | None  # None for a run rebuilt for `predict` (load_run(with_data=False))
    collate: Any
    module: EnsembleModule
    info: RunInfo | None = None   # class names, modality, sample rate (run_info.json)

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


def check_method(config: RunConfig) -> None:
    """The method's name, its option names and the option values that need no model, checked before the data
    and the model load (a mistake there would otherwise be reported after the model's loading time)."""
    name, options = config.method.name, dict(config.method.options)
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r}; known methods: {sorted(METHODS)}")
    num_members = 1 if name == "single_lora" else options.pop("num_members", 4)
    options.pop("num_members", None)
    params = inspect.signature(METHODS[name]).parameters
    accepted = set(params) - {"model", "num_members"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # builders taking **options take LoRA fields
        accepted = (accepted - {p for p, v in params.items() if v.kind is v.VAR_KEYWORD}) | set(LORA_FIELDS)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"method: unknown option(s) {unknown} for method {name!r}; it accepts {sorted(accepted)}")
    shared = set(options) & set(LORA_FIELDS)  # the same meaning in every method that takes them ...
    if name == "batch_ensemble":
        shared -= {"init", "init_std"}          # ... except BatchEnsemble's own fast-weight init
    try:
        LoraEnsembleConfig(num_members=num_members, **{k: options[k] for k in shared})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method: {e}") from None


def build_run(config: RunConfig, info: RunInfo | None = None, with_data: bool = True) -> Run:
    """Load data, build the model and the method, wrap them in the training module.

    `info` (a finished run's run_info.json) fixes the classes: loaded data must have the same ones; with
    `with_data=False` no data is loaded at all (`predict`) and the model is built from `info` alone."""
    check_method(config)
    L.seed_everything(config.seed, verbose=False)
    splits = None
    if with_data or info is None:
        try:
            splits = load_dataset(config.data.name, **config.data.options)
        except TypeError as e:  # unknown / missing loader arguments
            raise ConfigError(f"data: {e}") from None
        loaded = RunInfo.from_splits(splits, config.model)
        if info is not None and loaded.class_names != info.class_names:
            new = [c for c in loaded.class_names if c not in info.class_names]
            raise ConfigError(f"data: the data has class(es) {new or loaded.class_names} but the run was trained "
                              f"on {info.class_names}" + ("" if new else " (in this order)"))
        info = info or loaded
    model, collate = build_model(config.model, info.num_classes, info.modality, info.sample_rate,
                                 class_names=info.class_names, dataset=config.data.name, prompt=config.data.prompt,
                                 kind=config.data.kind, choice_score=config.data.choice_score)
    options = dict(config.method.options)
    if accepts_option(config.method.name, "seed"):
        options.setdefault("seed", config.seed)
    try:
        method = build_method(config.method.name, model, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method: {e}") from None
    t = config.training
    weights = splits.class_weights().tolist() if t.class_weights and splits is not None else None
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
    return Run(config, splits, collate, module, info)


def make_trainer(config: RunConfig, run_dir: str | None, max_epochs: int | None = None) -> L.Trainer:
    t = config.training
    callbacks: list[L.Callback] = [EpochTimer(), *progress_callbacks(t.progress_bar)]  # bar or epoch lines
    if t.early_stopping_patience is not None:  # budget by convergence: stop on val/nll, keep the best epoch
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks += [EarlyStopping(monitor=VAL_MONITOR, mode="min", patience=t.early_stopping_patience,
                                    check_finite=True, verbose=False), BestValidation(VAL_MONITOR)]
    if t.posterior is not None and run_dir is not None:  # SWAG moments / TFB sigma, in <run>/posterior (issue 15)
        from lora_ensemble.lightning.posterior import PosteriorCallback

        callbacks.append(PosteriorCallback(**t.posterior, path=os.path.join(run_dir, POSTERIOR_DIR),
                                           partial=max_epochs is not None and max_epochs < t.epoch_budget))
    if run_dir is not None:  # checkpoints/last.ckpt every n steps, every epoch and on SIGTERM (checkpointing.py)
        callbacks.append(RunCheckpoint(os.path.join(run_dir, CHECKPOINT), t.checkpoint_every_n_steps,
                                       epochs=t.epoch_budget, max_steps=t.max_steps))
    return L.Trainer(
        max_epochs=max_epochs or t.epoch_budget, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.accumulate_grad_batches, precision=t.precision, accelerator=t.accelerator,
        devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs") if run_dir else False,
        enable_checkpointing=run_dir is not None, enable_progress_bar=has_bar(callbacks), enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=run_dir,
        inference_mode=True,  # evaluation under torch.inference_mode, as Lightning does by default
        check_val_every_n_epoch=t.val_every_n_epochs,
    )


def total_steps(config: RunConfig, train_size: int, world_size: int = 1) -> int:
    """Optimizer steps of the whole run, from the config alone (not from a trainer that may have been
    started with fewer epochs), so a resumed run follows the same learning-rate schedule."""
    t = config.training
    batches = math.ceil(math.ceil(train_size / world_size) / config.data.batch_size)
    by_epochs = t.epoch_budget * max(1, math.ceil(batches / t.accumulate_grad_batches))
    return min(t.max_steps, by_epochs) if t.max_steps > 0 else by_epochs  # Lightning stops at the first reached


def fit(config: RunConfig, run_dir: str, resume: bool = False, max_epochs: int | None = None,
        overwrite: bool = False, evaluate_test: bool = True) -> tuple[dict[str, Any], Run]:
    """Train, evaluate on the test (and OOD) split, write the run folder; returns (results.json's content,
    the Run with the trained module).

    With `training.early_stopping_patience`, training stops once val/nll has not improved for that many
    epochs (or at `training.max_epochs`), and the weights of the epoch with the lowest val/nll are put back
    before calibration and testing; results.json then has `epochs_run`, `best_epoch`, `best_val_nll` and
    `val_nll_history` (one value per epoch). `evaluate_test=False` (a tuning trial) builds no test or OOD
    loader at all: results hold the validation metrics only (`val_metrics`, `best_val_nll`).

    Everything (config, data, model, method, trainer settings) is validated before anything is written, so a
    failing call leaves run_dir as it was. `overwrite` then removes what an earlier run wrote there (results,
    weights, checkpoints), so the folder never mixes two runs."""
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if resume and not os.path.isfile(last):
        raise ConfigError(f"--resume: no checkpoint at {last}")
    if resume:
        checkpoint = read_checkpoint(last)  # ConfigError for a truncated / corrupt file
        if training_complete(checkpoint) and os.path.isfile(os.path.join(run_dir, "results.json")):
            raise ConfigError(f"--resume: the run in {run_dir} has finished (see its results.json); "
                              "there is nothing to resume")
        del checkpoint
    saved = os.path.join(run_dir, CONFIG_FILE)
    if resume and os.path.isfile(saved):
        previous = load_run_config(saved)
        if previous.to_dict() != config.to_dict():
            raise ConfigError(f"--resume: the config differs from the one the run in {run_dir} started with")
    run = build_run(config)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = make_trainer(config, run_dir, max_epochs)
    except (MisconfigurationException, ValueError) as e:  # accelerator, devices, precision, strategy
        raise ConfigError(f"training: {str(e).splitlines()[0]}") from None
    if overwrite and launch_rank() == 0:
        remove_run_outputs(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_bytes(saved, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    run.info.write(run_dir)
    ws, rank = trainer.world_size, trainer.global_rank
    run.module.total_steps = total_steps(config, len(run.splits.train), ws)
    # the training loader keeps its place in the epoch's order, so a run resumed mid-epoch continues with
    # the very next batch (Lightning alone would start the epoch's order again)
    train_loader = ResumableLoader(run.loader("train", shuffle=True, world_size=ws, rank=rank), seed=config.seed)
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
    try:
        trainer.fit(run.module, train_loader, run.loader("val", world_size=ws, rank=rank),
                    ckpt_path=last if resume else None)
        segments = checkpoints.segments_s()  # training time of every segment, this one up to now
        best = next((c for c in trainer.callbacks if isinstance(c, BestValidation)), None)
        if best is not None:
            best.restore(run.module)  # the best validation epoch's weights, before anything is evaluated
        if config.training.temperature_scaling:
            calibrate(run, trainer)
        if evaluate_test:
            results = test(run, trainer)
        else:
            last = {f"val/{k}": v for k, v in run.module.last_metrics.get("val", {}).items() if not isinstance(v, list)}
            results = {"val_metrics": best.best_metrics if best is not None and best.best_metrics else last}
    except SIGTERMException:  # Lightning stops at the end of the batch; RunCheckpoint has written the checkpoint
        raise TrainingStopped(checkpoints.stop_message() if trainer.is_global_zero else 1) from None  # one line
    timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
    last_val = run.module.last_metrics.get("val", {}).get("nll")
    results.update(epochs_run=len(timer.epoch_times_s), best_epoch=best.best_epoch if best else None,
                   best_val_nll=best.best if best and best.best is not None else last_val,
                   val_nll_history=best.history if best else None)
    if not evaluate_test:
        results.update(train_time_s=sum(segments), train_epoch_times_s=timer.epoch_times_s)
        if trainer.is_global_zero:
            atomic_write_bytes(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2).encode())
        return results, run
    from lora_ensemble.app.diagnostics import (
        collapse_warning,  # one line on stderr when the predictions are all one class
    )

    logits, labels, _ = run.module.last_outputs["test"]
    results["prediction_collapse"] = collapse_warning(logits, labels, run.splits.class_names,
                                                      warn=trainer.is_global_zero)
    results.update(train_time_s=sum(segments), train_segments_s=segments, train_epoch_times_s=timer.epoch_times_s,
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


def load_run(run_dir: str, overrides: list[str] | None = None, with_data: bool = True) -> Run:
    """Rebuild a finished run from its folder (run_config.yaml, run_info.json, model/weights.safetensors).

    `with_data=False` (predict) loads no data set: classes, modality and preprocessing come from run_info.json
    (runs written before it existed still load their data for the class names)."""
    from safetensors import SafetensorError, safe_open

    config_path, weights_path = os.path.join(run_dir, CONFIG_FILE), os.path.join(run_dir, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} not found: --checkpoint must be a run folder written by `lora-ensemble fit`")
    try:
        tensors = load_file(weights_path)
        with safe_open(weights_path, "pt") as f:
            temperature = float((f.metadata() or {}).get("temperature", 1.0))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{weights_path} cannot be read ({e}): the file is damaged or truncated; "
                          "train the run again (lora-ensemble fit --overwrite)") from None
    run = build_run(load_run_config(config_path, overrides), read_run_info(run_dir), with_data=with_data)
    expected = run.module.trainable_state()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        details = "; ".join(f"{what}: {items[:3]}" for what, items in
                            (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes))
                            if items)
        raise ConfigError(f"{weights_path} does not fit the model built from {config_path} ({details})")
    run.module.load_state_dict(tensors, strict=False)
    run.module.temperature = temperature
    return run


RUN_OUTPUTS = ("results.json", "evaluation.json", INFO_FILE, "model", "checkpoints", POSTERIOR_DIR)


def remove_run_outputs(run_dir: str) -> None:
    """Remove what `fit` wrote into run_dir besides its config and logs (fit --overwrite)."""
    for name in RUN_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
