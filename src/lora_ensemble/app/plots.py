"""Evaluation plots written as PNG files (matplotlib's Agg canvas; no display and no pyplot global state).

Every function takes an output ``path``, creates missing parent folders, writes atomically (a temporary file
in the same folder, then ``os.replace``), and returns the path as a :class:`pathlib.Path`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_ensemble import metrics
from lora_ensemble.io import atomic_write


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 4.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; returns ``Path(path)``."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def reliability_diagram(
    probs: Any,
    labels: Any,
    path: str | os.PathLike,
    n_bins: int = 15,
    title: str | None = None,
    *,
    from_logits: bool = False,
) -> Path:
    """Reliability diagram of ``probs: (N, C)``: per-bin accuracy vs. confidence over equal-width bins ``(lo, hi]``,
    the gap between them, and the per-bin sample counts below; the title carries the ECE.

    Accuracy is a filled bar of height ``acc_b``; the bin's mean confidence ``conf_b`` is a red line across the bin,
    and the gap between them an outlined (unfilled) box, hatched where the bin is over-confident
    (``conf_b > acc_b``, above the bar). Nothing filled is drawn over an accuracy bar, so an under-confident bin
    still reads as its accuracy."""
    bins = metrics.calibration_bins(probs, labels, n_bins, from_logits=from_logits)
    ece = metrics.expected_calibration_error(probs, labels, n_bins, from_logits=from_logits)
    lower, width = bins.lower.cpu().numpy(), (bins.upper - bins.lower).cpu().numpy()
    count = bins.count.cpu().numpy()
    acc, conf = bins.accuracy.cpu().numpy(), bins.confidence.cpu().numpy()
    filled = count > 0
    over = filled & (conf > acc)
    under = filled & (conf < acc)

    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="tab:blue", edgecolor="black",
           zorder=2, label="accuracy")
    ax.bar(lower[over], (conf - acc)[over], bottom=acc[over], width=width[over], align="edge", fill=False,
           edgecolor="tab:red", hatch="//", linewidth=1.0, zorder=3, label="gap (over-confident)" if over.any() else "_nolegend_")
    ax.bar(lower[under], (acc - conf)[under], bottom=conf[under], width=width[under], align="edge", fill=False,
           edgecolor="tab:red", linestyle="--", linewidth=1.5, zorder=3,
           label="gap (under-confident)" if under.any() else "_nolegend_")
    ax.hlines(conf[filled], lower[filled], (lower + width)[filled], colors="tab:red", linewidth=2.0, zorder=4,
              label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)  # off the bars
    ax.set_title(f"{title + ' — ' if title else 'Reliability diagram — '}ECE = {ece:.4f}")
    ax_count.bar(lower, count, width=width, align="edge", color="gray", edgecolor="black")
    for x, w, c in zip(lower[filled], width[filled], count[filled]):
        ax_count.annotate(f"{int(c)}", (x + w / 2, c), ha="center", va="bottom", fontsize=7)
    ax_count.set(xlabel="confidence (max probability)", ylabel="count")
    return save_png(fig, path)


def risk_coverage_plot(
    curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Risk-coverage curves of several methods on one axes: ``curves[name] = (member_logits (M, N, C), labels (N,))``.

    Each curve ranks samples by the max probability of the ensemble predictive; its AURC is in the legend.
    """
    if not curves:
        raise ValueError("curves is empty; pass {name: (member_logits, labels)} with at least one method")
    fig, ax = new_figure()
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curves[{name!r}] must be a (member_logits, labels) pair, got {type(pair).__name__}")
        probs = metrics.predictive(pair[0]).probs
        coverage, risk = metrics.risk_coverage(probs, pair[1])
        ax.plot(coverage, risk, label=f"{name} (AURC = {float(risk.mean()):.4f})")
    ax.set(xlim=(0, 1), xlabel="coverage", ylabel="risk (error rate among kept)", title=title or "Risk-coverage")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def uncertainty_histogram(
    score_in: Any,
    score_out: Any,
    path: str | os.PathLike,
    score_name: str = "entropy",
    bins: int = 30,
    title: str | None = None,
) -> Path:
    """Overlaid density histograms of an uncertainty score, in-distribution ``(N_in,)`` vs. OOD ``(N_out,)``,
    on shared bin edges; the title carries the AUROC (higher score = more OOD)."""
    result = metrics.ood_metrics(score_in, score_out)  # validates both score arrays
    s_in = np.asarray(_to_numpy(score_in), dtype=np.float64)
    s_out = np.asarray(_to_numpy(score_out), dtype=np.float64)
    edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=bins)
    fig, ax = new_figure()
    ax.hist(s_in, bins=edges, density=True, alpha=0.5, color="tab:blue", label=f"in-distribution (n={len(s_in)})")
    ax.hist(s_out, bins=edges, density=True, alpha=0.5, color="tab:orange", label=f"OOD (n={len(s_out)})")
    ax.set(xlabel=score_name, ylabel="density")
    ax.set_title(f"{title + ' — ' if title else ''}{score_name}: AUROC = {result['auroc']:.4f}")
    ax.legend()
    return save_png(fig, path)


def member_bars(member_logits: Any, labels: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Bars of each member's accuracy and NLL next to the ensemble's (predictive ``p̄ = 1/M Σ_m softmax(z_m)``)."""
    per_member = metrics.member_metrics(member_logits, labels)
    probs = metrics.predictive(member_logits).probs
    ens = {"acc": metrics.accuracy(probs, labels), "nll": metrics.negative_log_likelihood(probs, labels)}
    m = len(per_member["acc"])
    names = [f"m{i}" for i in range(m)] + ["ensemble"]
    colors = ["tab:blue"] * m + ["tab:red"]
    fig, axes = new_figure(ncols=2, width=max(4.0, 0.5 * (m + 1) + 2.0))
    for ax, key, label in zip(axes, ("acc", "nll"), ("accuracy", "NLL (nats)")):
        values = per_member[key] + [ens[key]]
        ax.bar(names, values, color=colors, edgecolor="black")
        ax.axhline(float(np.mean(per_member[key])), color="gray", linestyle="--", label="member mean")
        ax.set(ylabel=label, title=label, ylim=(0, 1.2 * max(values)))  # headroom for the legend
        ax.tick_params(axis="x", rotation=90 if m > 12 else 0)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def reliability_grid(runs: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, n_bins: int = 15) -> Path:
    """The reliability diagrams of several methods side by side on shared axes: ``runs[name] = (probs (N, C),
    labels (N,))``. Per panel: accuracy per confidence bin (bars), mean confidence per bin (red line), the
    diagonal, the ECE in the title and the bin counts as the bars' shade (darker = more samples)."""
    if not runs:
        raise ValueError("runs is empty; pass {name: (probs, labels)} with at least one method")
    fig, axes = new_figure(ncols=len(runs), width=3.0, height=3.4)
    axes = np.atleast_1d(axes)
    for ax, (name, (probs, labels)) in zip(axes, runs.items()):
        bins = metrics.calibration_bins(probs, labels, n_bins)
        ece = metrics.expected_calibration_error(probs, labels, n_bins)
        lower, width = bins.lower.cpu().numpy(), (bins.upper - bins.lower).cpu().numpy()
        count, acc, conf = bins.count.cpu().numpy(), bins.accuracy.cpu().numpy(), bins.confidence.cpu().numpy()
        filled = count > 0
        shade = 0.25 + 0.75 * count[filled] / max(1.0, float(count.max()))
        ax.bar(lower[filled], acc[filled], width=width[filled], align="edge", edgecolor="black",
               color=[(0.12, 0.47, 0.71, a) for a in shade], zorder=2)
        ax.hlines(conf[filled], lower[filled], (lower + width)[filled], colors="tab:red", linewidth=2.0, zorder=3)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{name}\nECE {ece:.3f}")
    axes[0].set_ylabel("accuracy (bars); red: mean confidence")
    return save_png(fig, path)


def cost_plot(points: Mapping[str, tuple[float, float | None, float, float | None]], path: str | os.PathLike,
              xlabel: str, ylabel: str, title: str | None = None) -> Path:
    """One point per method with its error bars: ``points[name] = (x mean, x half-width, y mean, y half-width)``
    (half-widths of 95 % intervals; None: no bar), e.g. test NLL against training time or peak memory."""
    if not points:
        raise ValueError("points is empty; pass {name: (x, x_err, y, y_err)} with at least one method")
    fig, ax = new_figure(width=6.0)
    for name, (x, x_err, y, y_err) in points.items():
        ax.errorbar([x], [y], xerr=None if x_err is None else [x_err], yerr=None if y_err is None else [y_err],
                    fmt="o", capsize=4, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or f"{ylabel} against {xlabel} (mean ± 95 % interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
