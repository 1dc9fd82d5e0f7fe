"""Plots: each call writes a PNG atomically at the given path and returns that path."""

from pathlib import Path

import numpy as np
import pytest

from lora_ensemble import plots
from lora_ensemble.metrics import ood_scores, predictive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def members(m=3, n=120, c=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    return rng.normal(size=(m, n, c)) + 2.0 * np.eye(c)[labels], labels


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left behind


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
