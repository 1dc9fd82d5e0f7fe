"""Tables and figures for one or several finished runs (used by `demo` and `compare`).

A run's outputs are `(member_logits (M, N, C), labels (N,), ood_member_logits (M, N_ood, C) | None)`;
nothing here asks which method produced them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lora_ensemble.app import plots
from lora_ensemble.metrics import ood_scores, predictive

Outputs = tuple[Tensor, Tensor, "Tensor | None"]

# (column title, key in a result row, format)
COLUMNS = [
    ("acc", "acc", ".4f"), ("F1", "f1", ".4f"), ("ECE", "ece", ".4f"), ("NLL", "nll", ".4f"),
    ("Brier", "brier", ".4f"), ("OOD AUROC (entropy)", "ood/auroc_entropy", ".4f"),
    ("OOD AUROC (MI)", "ood/auroc_mi", ".4f"), ("AURC", "sc/aurc", ".4f"),
    ("disagreement", "div/disagreement", ".4f"), ("train s", "train_time_s", ".1f"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, tuple):  # (mean, std) over seeds
        mean, std = value
        return f"{mean:{fmt}} ± {std:{fmt}}"
    return f"{value:{fmt}}"


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A Markdown table, one row per run name; a row with an `error` shows it instead of numbers."""
    header = "| method | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        if row.get("error"):
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * (len(columns) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def flat_row(results: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from a run's results.json content: its metrics plus timings."""
    row = {k: v for k, v in results.get("metrics", {}).items() if not isinstance(v, list)}
    for key in ("train_time_s", "inference_time_per_sample_s", "trainable_parameters", "total_parameters",
                "bytes_in_memory", "peak_memory_bytes"):
        if key in results:
            row[key] = results[key]
    return row


def write_figures(outputs: Mapping[str, Outputs], folder: str | os.PathLike, highlight: str | None = None) -> list[Path]:
    """Reliability diagram per run, one risk-coverage plot of all runs, and for `highlight` (default: the run
    with most members) the OOD histogram of mutual information and the member-vs-ensemble bars."""
    folder = Path(folder)
    written = []
    for name, (logits, labels, _) in outputs.items():
        written.append(plots.reliability_diagram(predictive(logits).probs, labels, folder / f"reliability_{name}.png",
                                                 title=name))
    written.append(plots.risk_coverage_plot({n: (o[0], o[1]) for n, o in outputs.items()}, folder / "risk_coverage.png"))
    if highlight is None:
        highlight = max(outputs, key=lambda n: outputs[n][0].shape[0])
    logits, labels, ood_logits = outputs[highlight]
    if ood_logits is not None:
        score = "mi" if logits.shape[0] > 1 else "entropy"
        written.append(plots.uncertainty_histogram(ood_scores(logits)[score], ood_scores(ood_logits)[score],
                                                   folder / "uncertainty_histogram.png", score_name=score,
                                                   title=highlight))
    if logits.shape[0] > 1:
        written.append(plots.member_bars(logits, labels, folder / "members.png", title=highlight))
    return written
