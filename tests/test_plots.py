"""Plots: each call writes a PNG atomically at the given path and returns that path."""

from pathlib import Path

import numpy as np
import pytest

from lora_ensemble.app import plots
from lora_ensemble.metrics import ood_scores, predictive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def members(m=3, n=120, c=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    return rng.normal(size=(m, n, c)) + 2.0 * np.eye(c)[labels], labels


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp-")] == []  # no temp file left behind


def test_reliability_diagram_writes_a_png(tmp_path):
    z, y = members()
    out = plots.reliability_diagram(predictive(z).probs, y, tmp_path / "nested" / "reliability.png", title="val")
    assert out == tmp_path / "nested" / "reliability.png"
    assert_png(out)


def test_reliability_diagram_from_logits_and_str_path(tmp_path):
    z, y = members(m=1)
    out = plots.reliability_diagram(z[0], y, str(tmp_path / "rel.png"), n_bins=10, from_logits=True)
    assert_png(out)


def test_risk_coverage_plot_draws_several_methods(tmp_path):
    z, y = members()
    curves = {"LoRA-Ensemble": (z, y), "single": (z[:1], y)}
    assert_png(plots.risk_coverage_plot(curves, tmp_path / "rc.png", title="CIFAR"))
    with pytest.raises(ValueError, match="curves is empty"):
        plots.risk_coverage_plot({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="pair"):
        plots.risk_coverage_plot({"x": z}, tmp_path / "bad.png")


def test_uncertainty_histogram_compares_in_and_out_of_distribution(tmp_path):
    z, _ = members()
    z_ood, _ = members(n=60, seed=1)
    s_in, s_out = ood_scores(z)["entropy"], ood_scores(z_ood - 2.0)["entropy"]
    assert_png(plots.uncertainty_histogram(s_in, s_out, tmp_path / "hist.png", score_name="entropy"))
    single = members(m=1)[0]
    mi_in, mi_out = ood_scores(single)["mi"], ood_scores(single)["mi"]  # all zeros: degenerate range
    assert_png(plots.uncertainty_histogram(mi_in, mi_out, tmp_path / "mi.png", score_name="mi"))


def test_member_bars_show_members_and_the_ensemble(tmp_path):
    z, y = members(m=5)
    assert_png(plots.member_bars(z, y, tmp_path / "members.png", title="ViT"))


def test_a_failed_plot_leaves_an_existing_file_untouched(tmp_path):
    z, y = members()
    path = plots.reliability_diagram(predictive(z).probs, y, tmp_path / "rel.png")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="from_logits=True"):
        plots.reliability_diagram(z[0], y, path)  # logits passed as probabilities
    with pytest.raises(ValueError, match="score_out is empty"):
        plots.uncertainty_histogram([0.1, 0.2], [], tmp_path / "hist.png")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.png"]


def calibrated_case(confidence: float, accuracy: float, n: int = 200, c: int = 4):
    """Probabilities whose max is `confidence` for every sample, argmax right for a share `accuracy` of them."""
    probs = np.full((n, c), (1.0 - confidence) / (c - 1))
    probs[:, 0] = confidence
    labels = np.zeros(n, dtype=int)
    labels[int(round(accuracy * n)):] = 1
    return probs, labels


def drawn_figure(monkeypatch, tmp_path, probs, labels):
    """The Figure that reliability_diagram hands to the PNG writer (and the PNG it wrote)."""
    figures = []
    real_save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig) or real_save(fig, path))
    out = plots.reliability_diagram(probs, labels, tmp_path / "rel.png")
    assert_png(out)
    return figures[0]


def face_alpha(patch) -> float:
    return 0.0 if not patch.get_fill() else float(patch.get_facecolor()[3])


@pytest.mark.parametrize("confidence, accuracy", [(0.48, 0.85), (0.95, 0.60)], ids=["under-confident", "over-confident"])
def test_reliability_diagram_accuracy_bar_is_the_bin_accuracy_and_stays_visible(monkeypatch, tmp_path, confidence,
                                                                                 accuracy):
    # A bin of accuracy 0.85 at confidence 0.48 must read as 0.85: the accuracy bar has that height and no
    # filled patch (e.g. a coloured gap layer) is drawn over any part of it.
    probs, labels = calibrated_case(confidence, accuracy)
    ax = drawn_figure(monkeypatch, tmp_path, probs, labels).axes[0]
    bars = next(c for c in ax.containers if c.get_label() == "accuracy")
    assert len(bars.patches) == 1
    bar = bars.patches[0]
    assert bar.get_height() == pytest.approx(accuracy)
    assert bar.get_x() < confidence <= bar.get_x() + bar.get_width()
    assert face_alpha(bar) == 1.0
    drawn = sorted(ax.patches, key=lambda p: p.get_zorder())  # stable: equal zorder keeps drawing order
    box = bar.get_bbox()
    for patch in drawn[drawn.index(bar) + 1:]:
        other = patch.get_bbox()
        overlap = min(box.xmax, other.xmax) - max(box.xmin, other.xmin) > 1e-9 and \
            min(box.ymax, other.ymax) - max(box.ymin, other.ymin) > 1e-9
        if overlap:
            assert face_alpha(patch) == 0.0, f"{patch} is filled and covers the accuracy bar"
    # the confidence is drawn too: some patch or line reaches the bin's confidence inside the bin
    marks = [p for p in ax.patches if p is not bar and min(abs(p.get_bbox().ymin - confidence),
                                                             abs(p.get_bbox().ymax - confidence)) < 1e-9]
    assert marks, "nothing marks the bin's confidence"
