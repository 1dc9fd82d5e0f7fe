"""`lora-ensemble compare`: several methods, same data and seeds, one table; a failure is shown, never hidden."""

from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml
from compare_configs import tiny_compare_config

from lora_ensemble.app import compare
from lora_ensemble.app.compare import run_compare
from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.methods import METHODS

TINY = tiny_compare_config({"epochs": 1, "lr": 1e-3}, compare={"single": {"training": {"lr": 1e-4}}})


def main_table(text):
    """The rows of the results table (the one whose header starts with '| method |'), by method."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows[line.split("|")[1].strip()] = line
    return rows


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """Two methods x two seeds, each run in its own process (the default)."""
    folder = tmp_path_factory.mktemp("compare")
    config = folder / "compare.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = folder / "out"
    summary = run_compare(str(config), ["single", "lora_ensemble"], seeds=2, output_dir=str(out))
    return summary, out


def test_compare_writes_table_csv_json_figures_and_run_folders(isolated):
    summary, out = isolated
    table = (out / "results.md").read_text()
    assert "| single |" in table and "| lora_ensemble |" in table and " ± " in table
    for title in ("acc", "ECE", "NLL", "Brier", "OOD AUROC", "AURC", "disagreement", "trainable params",
                  "params in memory", "train s", "infer ms/sample", "peak MB", "epochs"):
        assert f" {title}" in main_table(table)["method"]
    assert "95 % Student-t interval" in table
    assert "| lora_ensemble - method | NLL | ECE | Brier |" in table  # the paired bootstrap, vs lora_ensemble
    assert set(summary["paired"]) == {"single"} and set(summary["paired"]["single"]) == {"nll", "ece", "brier"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["single", "lora_ensemble"] and all(r["seeds_ok"] == "2" for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("lora-ensemble compare --config ") and "--seeds 2" in saved["command"]
    assert saved["config"]["compare"] == TINY["compare"]
    for method in ("single", "lora_ensemble"):
        runs = saved["runs"][method]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["status"] == "ok" for r in runs)
        assert runs[0]["results"]["metrics"]["acc"] == summary["runs"][method][0]["results"]["metrics"]["acc"]
        assert runs[0]["peak_memory_bytes"] > runs[0]["baseline_rss_bytes"] > 0  # measured in the run's own process
        assert set(saved["aggregate"][method]["acc"]) == {"mean", "std", "ci95", "n"}
        for seed in (0, 1):
            folder = out / method / f"seed{seed}"
            for name in ("results.json", "run_config.yaml", "test_outputs.safetensors", "compare_run.json", "log.txt"):
                assert (folder / name).is_file(), folder / name
    assert saved["runs"]["single"][0]["config"]["training"]["lr"] == 1e-4  # the per-method override
    assert saved["runs"]["single"][0]["config"]["method"] == {"name": "single", "num_members": 2}  # LoRA options dropped
    assert saved["runs"]["lora_ensemble"][1]["config"]["seed"] == 1
    assert {os.path.basename(p) for p in saved["figures"]} >= {"risk_coverage.png", "reliability_single.png",
                                                                "reliability_lora_ensemble.png", "reliability_all.png",
                                                                "nll_vs_train_time.png", "nll_vs_memory.png"}


def test_every_method_runs_and_failures_show_their_error_in_their_row(tiny_config, tmp_path):
    out = tmp_path / "out"
    summary = run_compare(tiny_config, None, seeds=1, output_dir=str(out), isolate=False, overrides=[
        "compare.mc_dropout.method.dropout=0.0", "compare.mc_dropout.method.attention_dropout=0.0",  # cannot build
        "compare.snapshot.training.precision=no-such-precision",                                     # fails in fit
    ])
    assert summary["methods"] == list(METHODS)
    rows = main_table((out / "results.md").read_text())
    assert set(rows) == {"method", *METHODS}
    assert "failed: method: mc_dropout needs dropout" in rows["mc_dropout"]
    assert "failed: " in rows["snapshot"] and "no-such-precision" in rows["snapshot"]
    assert not (out / "mc_dropout").exists()  # refused before any training
    for method in set(METHODS) - {"mc_dropout", "snapshot"}:
        assert "failed" not in rows[method] and summary["runs"][method][0]["status"] == "ok"
    assert summary["runs"]["snapshot"][0]["traceback"]


def test_an_unknown_method_lists_the_known_ones_before_anything_runs(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['lora_ensembel'\]; known methods: .*'lora_ensemble'"):
        run_compare(tiny_config, ["single", "lora_ensembel"], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_run_process_that_dies_without_a_result_is_reported(tiny_config, tmp_path, monkeypatch):
    config, _ = compare.method_config(*compare.read_compare_config(tiny_config), "single", 0)
    monkeypatch.setattr(compare.sys, "executable", "/bin/false")
    status = compare.run_isolated(config, str(tmp_path / "run"))
    assert status["status"] == "failed" and "ended without a result (exit code 1)" in status["error"]


def test_a_failed_seed_gets_its_own_row_beside_the_mean_of_the_others():
    def ok(acc):
        return {"status": "ok", "results": {"metrics": {"acc": acc}, "train_time_s": 2.0}}

    failed = {"status": "failed", "error": "RuntimeError: out | of memory"}
    rows = compare.table_rows({"explicit": [ok(0.8), failed, ok(0.9)]})
    # mean, half-width of the 95 % t-interval: t_{0.975, 1} * s / sqrt(2) = 12.706 * 0.0707 / 1.414
    assert rows["explicit"]["acc"] == pytest.approx((0.85, 12.706 * 0.05), abs=1e-4)
    assert rows["explicit"]["train_time_s"] == 2.0 and rows["explicit"]["seeds"] == "2/3"
    assert rows["explicit (seed1)"] == {"error": "RuntimeError: out \\| of memory"}  # escaped for Markdown
