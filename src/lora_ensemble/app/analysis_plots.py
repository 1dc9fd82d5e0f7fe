"""Figures of `lora-ensemble analyze` (PNG, matplotlib's Agg canvas, written atomically as in app/plots.py):
the disagreement heatmap, the diversity-accuracy plane, loss and accuracy along the member paths with the
same-member control, linear CKA per block, and one figure per sweep of the diversity study."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_ensemble.app.plots import new_figure, save_png


def _heatmap(ax: Any, matrix: Any, title: str, vmin: float | None = None, vmax: float | None = None) -> None:
    data = np.asarray(matrix, dtype=float)
    image = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax)
    m = data.shape[0]
    ax.set(xticks=range(m), yticks=range(m), xlabel="member", ylabel="member", title=title)
    if m <= 8:
        for i in range(m):
            for j in range(m):
                ax.annotate(f"{data[i, j]:.3f}", (j, i), ha="center", va="center", fontsize=7, color="white")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def disagreement_heatmap(matrix: Any, path: str | os.PathLike, title: str = "pairwise disagreement") -> Path:
    """(M, M) disagreement matrix as a heatmap."""
    fig, ax = new_figure()
    _heatmap(ax, matrix, title, vmin=0.0)
    return save_png(fig, path)


def diversity_accuracy_plane(points: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike) -> Path:
    """Fort et al. 2019's plane: one dot per member pair (x = the pair's mean accuracy, y = disagreement /
    (1 - accuracy)), one colour per run or method (`points`: {label: the plane's points})."""
    fig, ax = new_figure()
    for label, pts in points.items():
        xs = [p["accuracy"] for p in pts if p["normalized_disagreement"] is not None]
        ys = [p["normalized_disagreement"] for p in pts if p["normalized_disagreement"] is not None]
        ax.scatter(xs, ys, label=label, alpha=0.8)
    ax.set(xlabel="accuracy of the pair (mean of the two members)", ylabel="disagreement / (1 - accuracy)",
           title="diversity-accuracy plane (Fort et al. 2019)")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def path_curves(curves: Mapping[str, Any], control: Mapping[str, Any] | None, path: str | os.PathLike) -> Path:
    """Loss (left) and accuracy (right) along every member pair's straight path, with the control (two snapshots
    of one member) dashed."""
    fig, (ax_loss, ax_acc) = new_figure(ncols=2)
    alphas = curves["alphas"]
    for (i, j), loss, acc in zip(curves["pairs"], curves["loss"], curves["acc"]):
        ax_loss.plot(alphas, loss, marker=".", label=f"members {i}-{j}")
        ax_acc.plot(alphas, acc, marker=".")
    if control is not None:
        for k, ((i, _), loss, acc) in enumerate(zip(control["pairs"], control["loss"], control["acc"])):
            ax_loss.plot(control["alphas"], loss, "k--", label="control (snapshots of one member)" if k == 0 else None)
            ax_acc.plot(control["alphas"], acc, "k--")
    ax_loss.set(xlabel="a (0: member i, 1: member j)", ylabel="test NLL", title="loss along the path")
    ax_acc.set(xlabel="a", ylabel="accuracy", title="accuracy along the path")
    ax_loss.legend(fontsize=7)
    return save_png(fig, path)


def cka_per_block(mean_cka: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Mean linear CKA over member pairs at every adapted block, in order."""
    fig, ax = new_figure()
    blocks = list(mean_cka)
    ax.plot(range(len(blocks)), [mean_cka[b] for b in blocks], marker="o")
    ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right", fontsize=7)
    ax.set(ylim=(min(0.9, min(mean_cka.values()) - 0.02) if mean_cka else 0, 1.005), ylabel="mean linear CKA over pairs",
           title="member representations per block")
    return save_png(fig, path)


def sweep(values: Sequence[Any], series: Mapping[str, Sequence[float | None]], knob: str,
          path: str | os.PathLike) -> Path:
    """One panel per metric of a sweep: mean (and the seeds' spread as error bars when series values are lists)
    against the knob's values."""
    names = list(series)
    fig, axes = new_figure(ncols=len(names), width=3.2, height=3.2)
    axes = np.atleast_1d(axes)
    x = np.arange(len(values))
    for ax, name in zip(axes, names):
        rows = [np.asarray([v for v in (s if isinstance(s, (list, tuple)) else [s]) if v is not None], dtype=float)
                for s in series[name]]
        mean = [r.mean() if len(r) else np.nan for r in rows]
        err = [r.std() if len(r) > 1 else 0.0 for r in rows]
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3)
        ax.set_xticks(x, [str(v) for v in values])
        ax.set(xlabel=knob, title=name)
    return save_png(fig, path)
