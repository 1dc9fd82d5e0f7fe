"""lora_ensemble.analysis and `lora-ensemble analyze` (issue 16): identical members are one mode, the rank-2r
path member is the interpolated update, the trace-identity cosine is the explicit one, CKA is the standard
formula, and the command's notes and errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiny_models
import torch

from lora_ensemble import LoraEnsemble
from lora_ensemble.analysis import (
    adapted_layers,
    cka_matrix,
    disagreement_matrix,
    function_space,
    kl_matrix,
    linear_cka,
    member_logits_and_features,
    member_pairs,
    path_curves,
    path_ensemble,
    per_class_disagreement,
    representation_similarity,
    weight_space,
)
from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear
from lora_ensemble.metrics import diversity


def _trained_like(ens: LoraEnsemble, seed: int = 0) -> LoraEnsemble:
    """Random non-zero B (as after training; B starts at 0) and distinct heads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ens.member_parameters().items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif not name.endswith("lora_A"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ens.eval()


def _tiny(family: str, members: int = 3, r: int = 2, **kw):
    model, make_batch = tiny_models.build(family)
    ens = _trained_like(LoraEnsemble(model, num_members=members, r=r, **kw))
    g = torch.Generator().manual_seed(1)
    batch = make_batch(6, g)
    labels = torch.randint(0, tiny_models.NUM_LABELS, (6,), generator=g)
    return ens, batch, labels


def _make_identical(ens: LoraEnsemble) -> None:
    with torch.no_grad():
        for p in ens.member_parameters().values():
            p.copy_(p[:1].expand_as(p))


# ---- identical members: one mode ------------------------------------------------------------------------
def test_identical_members_have_no_diversity_cosine_one_no_barrier_and_cka_one():
    ens, batch, labels = _tiny("bert")
    _make_identical(ens)
    logits, y, features = member_logits_and_features(ens, [(batch, labels)])
    fs = function_space(logits, y)
    assert fs["disagreement"] == 0 and np.allclose(fs["disagreement_matrix"], 0)
    assert np.allclose(fs["kl_matrix"], 0, atol=1e-9) and fs["kl"] == pytest.approx(0, abs=1e-9)
    ws = weight_space(ens)
    assert np.allclose(ws["cosine"], 1.0) and ws["mean_cosine"] == pytest.approx(1.0)
    assert ws["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    curves = path_curves(ens, [(batch, labels)], member_pairs(3), num_points=5)
    assert np.allclose(curves["barrier"], 0, atol=1e-6) and curves["mean_barrier"] == pytest.approx(0, abs=1e-6)
    cka = representation_similarity(features)
    assert len(cka["blocks"]) == 2 and all(np.allclose(m, 1.0) for m in cka["blocks"].values())


def test_different_members_differ():
    ens, batch, labels = _tiny("bert")
    logits, y, features = member_logits_and_features(ens, [(batch, labels)])
    assert weight_space(ens)["mean_cosine"] < 0.5
    assert function_space(logits, y)["kl"] > 0
    assert all(v < 1 - 1e-6 for v in representation_similarity(features)["mean_cka"].values())


# ---- the rank-2r path member ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "torchvision_vit", "timm_vit"])  # linear, MHA (fused + out), fused qkv
def test_the_rank_2r_member_is_the_interpolated_update_and_its_ends_are_the_members(family):
    ens, batch, _ = _tiny(family, members=3, r=2)
    alphas = [0.0, 0.3, 1.0]
    path = path_ensemble(ens, [(0, 2), (1, 0)], alphas)
    assert path.num_members == 6 and path.ensemble_config.r == 4
    frozen = {id(p) for p in ens.model.parameters() if not p.requires_grad}
    own_params = {id(p) for p in path.member_parameters().values()}
    assert {id(p) for p in path.model.parameters() if id(p) not in own_params} <= frozen  # shared, not copied
    layers, own = adapted_layers(path), adapted_layers(ens)
    assert layers and set(layers) == set(own)
    g = torch.Generator().manual_seed(3)
    for name, layer in layers.items():
        src = own[name]
        base = src.base_layer
        x = torch.randn(6, 2, src.in_features, generator=g)
        y = layer(x.repeat(6, 1, 1)).view(6, 6, 2, -1)  # (K, rows, 2, out)
        for k, ((i, j), a) in enumerate([(p, a) for p in [(0, 2), (1, 0)] for a in alphas]):
            dw = (1 - a) * src.delta_weight(i) + a * src.delta_weight(j)
            expected = x @ (base.weight + dw).T + (base.bias if base.bias is not None else 0)
            torch.testing.assert_close(y[k], expected, rtol=1e-5, atol=1e-5)
    # The end points are the members. In float32 only up to rounding: the rank-2r product sums r more (zero)
    # terms, which some CPU kernels reduce in another order (bit-equal on an Intel Xeon, ~1e-7 apart per layer
    # on an AMD EPYC, amplified through the tiny random ViTs); in float64 that rounding is ~1e-16.
    ens.double(), path.double()  # the frozen tensors are shared: converted once for both
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()} if isinstance(batch, dict) \
        else tuple(v.double() if v.is_floating_point() else v for v in batch)
    member = tiny_models.call(ens, batch)
    along = tiny_models.call(path, batch)
    ends = [(along[0], member[0]), (along[2], member[2]), (along[3], member[1]), (along[5], member[0])]
    for end, own_member in ends:  # a = 0 and a = 1 of (0, 2), then of (1, 0)
        torch.testing.assert_close(end, own_member, rtol=1e-12, atol=1e-12)


def test_the_path_keeps_the_members_scaling_with_lora_alpha():
    ens, batch, _ = _tiny("bert", lora_alpha=4)  # s = alpha / r = 2; a rank-2r LoRA of the same alpha has s = 1
    path = path_ensemble(ens, [(0, 1)], [0.0, 1.0])
    torch.testing.assert_close(tiny_models.call(path, batch)[1], tiny_models.call(ens, batch)[1])


def test_the_control_path_runs_from_one_state_to_another():
    ens, batch, labels = _tiny("bert")
    snapshot = {n: p.detach().clone() for n, p in ens.member_parameters().items()}
    end = tiny_models.call(ens, batch)
    _trained_like(ens, seed=5)  # the ensemble moves on; `snapshot` is the earlier state
    path = path_ensemble(ens, [(1, 1)], [0.0, 1.0], end_state=snapshot)
    torch.testing.assert_close(tiny_models.call(path, batch)[1], end[1])
    curves = path_curves(ens, [(batch, labels)], [(1, 1)], num_points=3, end_state=snapshot)
    assert len(curves["loss"][0]) == 3


def test_path_curves_are_the_same_in_pieces_and_barrier_is_the_bump_over_the_chord():
    ens, batch, labels = _tiny("bert", members=2)
    whole = path_curves(ens, [(batch, labels)], [(0, 1)], num_points=4)
    pieces = path_curves(ens, [(batch, labels)], [(0, 1)], num_points=4, max_rows=4 * 2)  # 2 samples at a time
    np.testing.assert_allclose(whole["loss"], pieces["loss"], rtol=1e-6)
    loss, a = np.asarray(whole["loss"][0]), np.asarray(whole["alphas"])
    assert whole["barrier"][0] == pytest.approx(max(loss - ((1 - a) * loss[0] + a * loss[-1])))


# ---- weight space -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "torchvision_vit"])
def test_trace_identity_cosine_equals_the_cosine_of_explicit_updates(family):
    ens, _, _ = _tiny(family, members=4, r=3)
    ens.double()  # explicit updates without float32 rounding
    layers = adapted_layers(ens)
    assert any(isinstance(m, LoraEnsembleFusedLinear) for m in layers.values()) == (family == "torchvision_vit")
    flat = torch.stack([torch.cat([layer.delta_weight(m).detach().double().flatten() for layer in layers.values()])
                        for m in range(4)])                                                    # (M, D)
    explicit = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    ws = weight_space(ens)
    np.testing.assert_allclose(ws["cosine"], explicit.numpy(), rtol=1e-9, atol=1e-12)
    name, layer = next(iter(layers.items()))
    one = torch.stack([layer.delta_weight(m).detach().double().flatten() for m in range(4)])
    np.testing.assert_allclose(ws["layers"][name]["cosine"],
                               (torch.nn.functional.normalize(one, dim=1) @ torch.nn.functional.normalize(one, dim=1).T),
                               rtol=1e-9, atol=1e-12)
    s = torch.linalg.svdvals(flat)
    q = s / s.sum()
    assert ws["effective_rank"] == pytest.approx(float(torch.exp(-(q * q.log()).sum())), rel=1e-6)
    np.testing.assert_allclose(ws["update_norms"], flat.norm(dim=1).numpy(), rtol=1e-9)


def test_weight_space_is_invariant_to_a_change_of_basis_of_A_and_B():
    ens, _, _ = _tiny("bert", members=3, r=2)
    before = weight_space(ens)["cosine"]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in adapted_layers(ens).values():
            assert isinstance(layer, LoraEnsembleLinear)
            R = torch.randn(3, 2, 2, generator=g) + 3 * torch.eye(2)
            layer.lora_A.copy_(torch.linalg.solve(R, layer.lora_A))   # A -> R^-1 A
            layer.lora_B.copy_(layer.lora_B @ R)                        # B -> B R
    np.testing.assert_allclose(weight_space(ens)["cosine"], before, rtol=1e-5, atol=1e-6)


# ---- function space -----------------------------------------------------------------------------------
def test_function_space_matrices_agree_with_the_metrics_means_and_by_hand():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    fs, means = function_space(z, y), diversity(z, y)
    iu = np.triu_indices(4, 1)
    assert np.asarray(fs["disagreement_matrix"])[iu].mean() == pytest.approx(means["disagreement"])
    assert np.asarray(fs["js_matrix"])[iu].mean() == pytest.approx(means["js"])
    assert np.asarray(fs["error_corr_matrix"])[iu].mean() == pytest.approx(means["error_corr"])
    kl = np.asarray(fs["kl_matrix"])
    assert kl[~np.eye(4, dtype=bool)].mean() == pytest.approx(means["kl"])
    p = torch.softmax(z.double(), -1)
    assert kl[1, 2] == pytest.approx(float((p[1] * (p[1].log() - p[2].log())).sum(-1).mean()))
    assert float(disagreement_matrix(z)[0, 3]) == pytest.approx(float((z[0].argmax(-1) != z[3].argmax(-1)).double().mean()))
    acc = (z.argmax(-1) == y).double().mean(1)
    point = next(q for q in fs["plane"] if (q["i"], q["j"]) == (0, 3))
    assert point["normalized_disagreement"] == pytest.approx(float(disagreement_matrix(z)[0, 3]) /
                                                             (1 - float(acc[0] + acc[3]) / 2))
    assert len(fs["plane"]) == 6 and kl_matrix(z).shape == (4, 4)


def test_per_class_disagreement():
    # class 0: members agree on both samples; class 1: member 1 differs on one of two samples (pairs: 1 of 3)
    votes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2], [0, 0, 1, 1]])
    z = torch.nn.functional.one_hot(votes, 3).double() * 5
    out = per_class_disagreement(z, torch.tensor([0, 0, 1, 1]))
    assert out[0] == 0 and out[1] == pytest.approx((0 + 2 / 3) / 2) and torch.isnan(out[2])


# ---- CKA ----------------------------------------------------------------------------------------------
def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA as HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with Gram matrices K = X X^T, L = Y Y^T and the
    centring matrix H = I - 11^T / n (Kornblith et al. 2019, eq. (2) with linear kernels)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def test_cka_equals_an_independent_numpy_computation_and_ignores_rotations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = x @ rng.normal(size=(6, 5)) + 0.5 * rng.normal(size=(40, 5)) + 3.0
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_numpy_cka(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(torch.from_numpy(x @ q * 2.5), torch.from_numpy(y)) == pytest.approx(_numpy_cka(x, y), rel=1e-10)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(x @ q)) == pytest.approx(1.0)
    features = torch.from_numpy(np.stack([x, x @ q, rng.normal(size=(40, 6))]))
    m = cka_matrix(features)
    assert m.shape == (3, 3) and m[0, 1] == pytest.approx(1.0) and m[0, 2] < 0.9


# ---- the command ----------------------------------------------------------------------------------------
TINY = {
    "seed": 0,
    "model": {"name": "tiny:text", "max_length": 16},
    "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "init_gain": 1.0},
    "data": {"name": "bbc_news", "batch_size": 4, "train_size": 8, "val_size": 4, "test_size": 8, "ood_size": 4},
    "training": {"epochs": 2, "lr": 1e-2, "warmup_steps": 1, "progress_bar": False, "accelerator": "cpu"},
}


def _fit(tmp_path, name, method, max_epochs=None, resume=False):
    from lora_ensemble.app.run_config import parse_run_config
    from lora_ensemble.app.runner import fit

    raw = json.loads(json.dumps(TINY))
    raw["method"] = method
    run_dir = str(tmp_path / name)
    fit(parse_run_config(raw), run_dir, max_epochs=max_epochs, resume=resume)
    return run_dir


def test_analyze_on_a_run_without_adapters_skips_weight_space_with_one_note(tmp_path, capsys):
    from lora_ensemble.app.cli import main

    run_dir = _fit(tmp_path, "explicit", {"name": "explicit", "num_members": 2})
    capsys.readouterr()
    out_file = tmp_path / "explicit.json"
    assert main(["analyze", "--checkpoint", run_dir, "--output", str(out_file)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "weight space" in notes[0] and "explicit" in notes[0]
    result = json.loads(out_file.read_text())
    assert result["weight_space"] is None and result["connectivity"] is None and result["representations"] is None
    assert result["function_space"]["num_members"] == 2 and len(result["function_space"]["disagreement_matrix"]) == 2


def test_analyze_on_a_lora_run_writes_every_part_the_control_and_the_figures(tmp_path, capsys):
    from lora_ensemble.app.cli import main

    run_dir = _fit(tmp_path, "lora", dict(TINY["method"]), max_epochs=1)
    snapshot = tmp_path / "epoch1.safetensors"
    os.replace(os.path.join(run_dir, "model", "weights.safetensors"), snapshot)
    _fit(tmp_path, "lora", dict(TINY["method"]), resume=True)     # the same run, trained on to its end
    assert main(["analyze", "--checkpoint", run_dir, "--plots", str(tmp_path / "fig"), "--control", str(snapshot),
                 "--points", "3"]) == 0
    result = json.loads((tmp_path / "lora" / "analysis.json").read_text())
    assert result["weight_space"]["cosine"][0][0] == pytest.approx(1.0)
    assert len(result["connectivity"]["loss"]) == 1 and len(result["connectivity"]["loss"][0]) == 3
    assert result["control"]["pairs"] == [[0, 0], [1, 1]] and result["representations"]["blocks"]
    assert sorted(os.listdir(tmp_path / "fig")) == ["cka.png", "disagreement.png", "paths.png", "plane.png"]
    assert "dW cosine" in capsys.readouterr().out


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_analyze_on_a_folder_that_is_not_a_run_is_one_error_line_and_status_2(tmp_path, make):
    import subprocess
    import sys

    path = tmp_path / "not_a_run"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "lora_ensemble.app.cli", "analyze", "--checkpoint", str(path)],
                          check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "run folder" in lines[0], proc.stderr
    assert not (tmp_path / "not_a_run" / "analysis.json").exists()
