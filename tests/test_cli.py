"""The `lora-ensemble` command, end to end on tiny data, as a user runs it."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_training import TINY_RUN

from lora_ensemble.app.cli import build_parser, main

EXE = str(Path(sys.executable).with_name("lora-ensemble"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    assert main(["fit", "--config", str(config), "--output-dir", str(folder / "run")]) == 0
    return folder


@pytest.mark.parametrize("command", ["demo", "fit", "evaluate", "predict", "compare", "benchmark"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lora-ensemble " + command in capsys.readouterr().out


def test_every_option_of_every_subcommand_has_help():
    import argparse

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings)}" for name, parser in subcommands.choices.items()
               for action in parser._actions if action.option_strings and not action.help]
    assert not missing, f"options without help text: {missing}"


def test_fit_prints_a_table_and_evaluate_reproduces_it(trained_run, capsys):
    results = json.loads((trained_run / "run" / "results.json").read_text())
    assert main(["evaluate", "--checkpoint", str(trained_run / "run"), "--plots", str(trained_run / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| lora_ensemble |" in out and "ECE" in out
    evaluation = json.loads((trained_run / "run" / "evaluation.json").read_text())
    assert evaluation["metrics"]["acc"] == pytest.approx(results["metrics"]["acc"])
    assert (trained_run / "plots" / "reliability_lora_ensemble.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_writes_class_probability_and_uncertainty_per_input(trained_run):
    inputs = trained_run / "inputs.txt"
    inputs.write_text("Shares rose after the bank reported profits\nThe striker scored twice in the final\n")
    out = trained_run / "predictions.csv"
    assert main(["predict", "--checkpoint", str(trained_run / "run"), "--input", str(inputs), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2
    for row in rows:
        assert row["prediction"] in {"business", "politics", "sports", "tech"}
        total, aleatoric, epistemic = float(row["total"]), float(row["aleatoric"]), float(row["epistemic"])
        probs = [float(row[f"p_{c}"]) for c in ("business", "politics", "sports", "tech")]
        assert total == pytest.approx(-sum(p * math.log(p) for p in probs), rel=1e-5)  # H[p], p the ensemble mean
        assert total == pytest.approx(aleatoric + epistemic, abs=1e-9) and epistemic >= 0
        assert sum(float(row[f"p_{c}"]) for c in ("business", "politics", "sports", "tech")) == pytest.approx(1.0)
        assert float(row["probability"]) == max(float(row[f"p_{c}"]) for c in ("business", "politics", "sports", "tech"))


def test_demo_quick_prints_the_comparison_and_writes_results_and_figures(tmp_path):
    proc = run_cli("demo", "--quick", "--no-progress", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lora_ensemble |" in proc.stdout and "| single_lora |" in proc.stdout
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["runs"]) == {"lora_ensemble", "single_lora"}
    assert "ood/auroc_mi" in summary["runs"]["lora_ensemble"]["metrics"]
    for figure in ("risk_coverage.png", "reliability_lora_ensemble.png", "uncertainty_histogram.png", "members.png"):
        assert (tmp_path / figure).stat().st_size > 1000, figure
