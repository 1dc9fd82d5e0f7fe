"""A run whose test predictions collapsed to one class says so: a one-line warning and a flag in results.json."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

from lora_ensemble.app.diagnostics import PredictionCollapseWarning, collapse_warning, prediction_collapse


def member_logits_predicting(classes: list[int], num_classes: int = 3, members: int = 2) -> torch.Tensor:
    """Member logits (M, N, C) whose ensemble prediction for sample i is classes[i]."""
    z = torch.zeros(members, len(classes), num_classes)
    z[:, torch.arange(len(classes)), torch.tensor(classes)] = 3.0
    return z


def test_collapsed_predictions_warn_once_naming_the_class_and_the_fraction():
    labels = torch.tensor([0] * 8 + [1] * 6 + [2] * 6)
    z = member_logits_predicting([0] * 19 + [1])
    with pytest.warns(PredictionCollapseWarning) as caught:
        info = collapse_warning(z, labels, ["sports", "business", "tech"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "'sports'" in message and "95.0%" in message and "40.0%" in message
    assert info == {"collapsed": True, "class": "sports", "fraction": 0.95, "label_fraction": 0.4, "n": 20}


@pytest.mark.parametrize("predicted, labels", [
    ([0] * 18 + [1, 2], [0] * 8 + [1] * 6 + [2] * 6),   # 90 % one class: below the threshold
    ([0] * 20, [0] * 19 + [1]),                          # the labels are one class too: nothing learned wrong
])
def test_predictions_that_did_not_collapse_give_no_warning(predicted, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = collapse_warning(torch.tensor(predicted), torch.tensor(labels))
    assert info["collapsed"] is False


def test_collapse_accepts_scores_and_refuses_what_is_not_predictions():
    scores = torch.tensor([[0.9, 0.1]] * 10)
    assert prediction_collapse(scores, torch.tensor([0, 1] * 5))["collapsed"] is True
    with pytest.raises(ValueError, match="as many"):
        prediction_collapse(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="threshold"):
        prediction_collapse(scores, torch.tensor([0, 1] * 5), threshold=1.5)
    with pytest.raises(ValueError, match="shape"):
        prediction_collapse(torch.rand(10), torch.tensor([0, 1] * 5))


def write_csv(path, labels):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((f"note number {i} about item {i % 7}", label) for i, label in enumerate(labels))


def test_fit_warns_and_flags_a_run_that_learned_only_the_majority_class(tmp_path):
    # Texts without signal and 90 % of the training rows one class: the model can only learn the prior.
    write_csv(tmp_path / "train.csv", ["a"] * 36 + ["b"] * 2 + ["c"] * 2)
    write_csv(tmp_path / "test.csv", ["a"] * 6 + ["b"] * 4 + ["c"] * 2)
    from lora_ensemble.app.run_config import parse_run_config
    from lora_ensemble.app.runner import fit

    config = parse_run_config({
        "model": {"name": "tiny:text", "max_length": 8},
        "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "init_gain": 1.0},
        "data": {"name": "csv", "batch_size": 8, "val_fraction": 0.1,
                 "path_or_paths": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}},
        "training": {"epochs": 3, "lr": 5e-2, "progress_bar": False, "accelerator": "cpu"},
    })
    with pytest.warns(PredictionCollapseWarning, match="'a'"):
        results, _ = fit(config, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["prediction_collapse"]["collapsed"] is True and saved["prediction_collapse"]["class"] == "a"
    assert saved["prediction_collapse"] == results["prediction_collapse"]
