"""Budget by convergence: `training.max_epochs` + early stopping on validation NLL, the best epoch restored."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from lora_ensemble.app.run_config import ConfigError, parse_run_config
from lora_ensemble.app.runner import fit, make_trainer

RUN = {
    "seed": 0,
    "model": {"name": "tiny:text", "max_length": 16},
    "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "init_gain": 1.0},
    "data": {"name": "bbc_news", "batch_size": 4, "train_size": 16, "val_size": 8, "test_size": 4, "ood_size": 4},
    # lr 0.05 on this tiny model: validation NLL is lowest after epoch 1, then rises (measured: 1.3889, 1.4103,
    # 1.3928), so patience 2 stops after epoch 3 with epoch 1 the best
    "training": {"max_epochs": 6, "early_stopping_patience": 2, "lr": 0.05, "warmup_steps": 0,
                 "progress_bar": False, "accelerator": "cpu"},
}


def config(**training):
    raw = json.loads(json.dumps(RUN))
    raw["training"].update(training)
    return parse_run_config(raw)


def validation_nll(run):
    trainer = make_trainer(run.config, None)
    trainer.validate(run.module, run.loader("val"), verbose=False)
    return run.module.last_metrics["val"]["nll"]


def test_early_stopping_restores_the_weights_of_the_best_validation_epoch(tmp_path):
    results, run = fit(config(), str(tmp_path))
    history = results["val_nll_history"]
    assert results["epochs_run"] == len(history) < 6                      # stopped before max_epochs
    assert results["best_epoch"] == 1 + history.index(min(history)) < results["epochs_run"]
    assert results["best_val_nll"] == min(history)
    # the tested model is the best epoch's: its validation NLL is the best logged one, not the last epoch's
    assert validation_nll(run) == pytest.approx(results["best_val_nll"], rel=1e-6)
    assert abs(history[-1] - results["best_val_nll"]) > 1e-3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best_epoch"] == results["best_epoch"] and saved["metrics"]["nll"] > 0


def test_without_early_stopping_max_epochs_is_the_budget_and_nothing_is_restored(tmp_path):
    results, run = fit(config(early_stopping_patience=None, max_epochs=2), str(tmp_path))
    assert results["epochs_run"] == 2 and results["best_epoch"] is None
    assert results["best_val_nll"] == pytest.approx(validation_nll(run), rel=1e-6)  # the last epoch's


def test_a_trial_fit_returns_validation_results_only(tmp_path):
    results, _ = fit(config(max_epochs=2), str(tmp_path), evaluate_test=False)
    assert "metrics" not in results and results["val_metrics"]["val/nll"] == pytest.approx(results["best_val_nll"])


@pytest.mark.parametrize("training, message", [
    ({"early_stopping_patience": 0}, "training.early_stopping_patience must be >= 1"),
    ({"val_every_n_epochs": 2}, "needs validation after every epoch"),
    ({"max_epochs": 0}, "training.max_epochs must be >= 1"),
])
def test_early_stopping_settings_are_checked_when_the_config_is_read(training, message):
    with pytest.raises(ConfigError, match=message):
        config(**training)


def test_a_run_that_stopped_early_counts_as_finished_for_resume(tmp_path):
    """Its last checkpoint says training reached its end, so `fit --resume` does not train it further."""
    from lora_ensemble.lightning.checkpointing import CHECKPOINT, read_checkpoint, training_complete

    results, _ = fit(config(), str(tmp_path))
    assert results["epochs_run"] < 6                                   # early stopping ended it
    assert training_complete(read_checkpoint(str(tmp_path / CHECKPOINT)))
