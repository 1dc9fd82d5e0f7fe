"""Posterior members (lora_ensemble.posterior): SWAG moments and draws, TFB's sigma, the sampled ensemble on the
same frozen backbone, chunked evaluation, files and errors."""

from __future__ import annotations

import math

import pytest
import torch

from lora_ensemble import LoraEnsemble, LoraPosterior
from lora_ensemble.core.twin import ensemble_like, frozen_tensors
from tiny_models import NUM_LABELS, build, call


def ensemble(family: str = "plain", M: int = 3, r: int = 2, seed: int = 0) -> tuple[LoraEnsemble, object]:
    model, make_batch = build(family, seed)
    return LoraEnsemble(model, num_members=M, r=r).eval(), make_batch


def perturb(ens: LoraEnsemble, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ens.member_parameters().values():
            p.add_(std * torch.randn(p.shape, generator=g))


def labelled(batch, n: int, seed: int = 0) -> list:
    y = torch.randint(0, NUM_LABELS, (n,), generator=torch.Generator().manual_seed(seed))
    return [dict(batch, labels=y)] if isinstance(batch, dict) else [(batch[0], y)]


# ---- SWAG ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["plain", "bert"])
def test_equal_snapshots_give_samples_equal_to_their_trained_member(family):
    ens, make_batch = ensemble(family)
    perturb(ens, 0.05, seed=1)  # trained-looking heads and B matrices (B starts at zero)
    post = LoraPosterior(ens, method="swag", rank=3)
    for _ in range(4):
        post.collect()
    batch = make_batch(5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = call(ens, batch).repeat_interleave(4, dim=0)  # member-major: member 0's 4 draws first
        sampled = post.sample(4, seed=7, scale=3.0)
        assert sampled.num_members == 3 * 4
        assert torch.equal(call(sampled, batch), expected)
        for name, p in sampled.member_parameters().items():
            assert torch.equal(p, ens.member_parameters()[name].repeat_interleave(4, dim=0)), name


def test_draws_match_the_swag_moments_and_are_reproducible_from_the_seed():
    ens, _ = ensemble("plain", M=2)
    rank, snapshots = 3, []
    post = LoraPosterior(ens, method="swag", rank=rank)
    for i in range(5):
        perturb(ens, 0.1, seed=10 + i)
        snapshots.append({n: p.detach().double().clone() for n, p in ens.member_parameters().items()})
        post.collect()
    name = next(n for n in snapshots[0] if n.endswith("lora_A"))
    other = next(n for n in snapshots[0] if n.endswith("lora_B"))           # another tensor of member 1
    width = snapshots[0][name][1].numel()
    theta = torch.stack([torch.cat([s[name][1].flatten(), s[other][1].flatten()]) for s in snapshots])  # (5, d)
    mean = theta.mean(0)
    diag = (theta ** 2).mean(0) - mean ** 2
    running = torch.stack([theta[: i + 1].mean(0) for i in range(5)])
    D = (theta - running)[-rank:]                                         # SWAG's last `rank` deviations
    cov = torch.diag(diag) / 2 + D.T @ D / (2 * (rank - 1))                # the covariance the issue names

    K = 6000
    drawn = post.draw(range(K, 2 * K), K, seed=0)                         # member 1's draws (rows K..2K-1)
    draws = torch.cat([drawn[name].double().flatten(1), drawn[other].double().flatten(1)], dim=1)
    emp_mean, emp_cov = draws.mean(0), torch.cov(draws.T)
    std = cov.diagonal().sqrt()
    assert torch.all((emp_mean - mean).abs() < 5 * std / math.sqrt(K))
    assert torch.allclose(emp_cov.diagonal(), cov.diagonal(), rtol=0.12)   # diagonal + low-rank variance
    across = cov[:width, width:]                                           # entries of A against entries of B
    i, j = divmod(int(across.abs().argmax()), across.shape[1])
    j += width
    corr = cov[i, j] / (std[i] * std[j])
    emp_corr = emp_cov[i, j] / (emp_cov[i, i] * emp_cov[j, j]).sqrt()
    assert abs(corr) > 0.2 and abs(emp_corr - corr) < 0.06                  # the low-rank part couples tensors

    again = post.draw(range(K, K + 5), K, seed=0)[name]
    assert torch.equal(again, post.draw(range(K, K + 5), K, seed=0)[name])
    assert not torch.equal(again, post.draw(range(K, K + 5), K, seed=1)[name])
    shape = snapshots[0][name][1].shape
    means = post.sample(2, scale=0.0).member_parameters()[name]              # scale 0: the running means
    assert torch.equal(means[2:], mean[:width].view(shape).expand(2, *shape).to(means.dtype))


def test_swag_without_heads_covers_the_adapters_alone_and_every_draw_keeps_its_members_head(tmp_path):
    ens, make_batch = ensemble("bert", M=2)
    post = LoraPosterior(ens, method="swag", rank=3, include_heads=False)
    for i in range(4):
        perturb(ens, 0.1, seed=20 + i)  # heads move too: a head Gaussian would have spread
        post.collect()
    params = {n: p.detach().clone() for n, p in ens.member_parameters().items()}
    heads = [n for n in params if "lora_" not in n]
    assert heads and set(post.swag.mean) == {n for n in params if "lora_" in n}
    sampled = post.sample(5, seed=3)
    for name, p in sampled.member_parameters().items():
        if name in heads:  # the trained head, in every draw of its member
            assert torch.equal(p, params[name].repeat_interleave(5, dim=0)), name
        else:
            assert not torch.equal(p, params[name].repeat_interleave(5, dim=0)), name
    with_heads = LoraPosterior(ens, method="swag", rank=3)
    with_heads.collect()
    with_heads.collect()
    assert with_heads.include_heads and set(with_heads.swag.mean) == set(params)

    post.save_pretrained(tmp_path / "post")
    loaded = LoraPosterior.from_pretrained(build("bert")[0], tmp_path / "post")
    assert loaded.include_heads is False and set(loaded.swag.mean) == set(post.swag.mean)
    batch = make_batch(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(call(loaded.sample(5, seed=3).eval(), batch), call(sampled.eval(), batch), atol=1e-6)


def test_draws_are_nested_in_k_and_a_new_seed_gives_other_members():
    ens, make_batch = ensemble("plain")
    post = LoraPosterior(ens, rank=2)
    post.collect()
    perturb(ens, 0.1, seed=3)
    post.collect()
    small, large = post.sample(2, seed=5), post.sample(4, seed=5)
    other = post.sample(2, seed=6)
    for name, p in small.member_parameters().items():
        q = large.member_parameters()[name]
        assert torch.equal(p, torch.cat([q[m * 4: m * 4 + 2] for m in range(3)]))
        if name.endswith("lora_A"):
            assert not torch.equal(p, other.member_parameters()[name])


# ---- the sampled ensemble ----------------------------------------------------------------------------
def test_sample_leaves_the_original_untouched_and_holds_no_copy_of_the_frozen_weights(tmp_path):
    ens, make_batch = ensemble("bert")
    perturb(ens, 0.05, seed=1)
    post = LoraPosterior(ens, rank=2)
    post.collect()
    perturb(ens, 0.05, seed=2)
    post.collect()
    batch = make_batch(4, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    with torch.no_grad():
        out_before = call(ens, batch)
    sampled = post.sample(3)
    assert ens.num_members == 3 and ens.row_contract.num_members == 3
    assert all(torch.equal(before[k], v) for k, v in ens.state_dict().items()) and before.keys() == ens.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(call(ens, batch), out_before)
        assert call(sampled, batch).shape[0] == 9

    # frozen weights: the very same storage; the only new memory is the sampled members' tensors
    ptrs = {t.data_ptr() for t in frozen_tensors(ens)}
    assert all(t.data_ptr() in ptrs for t in frozen_tensors(sampled))
    new = sum(p.numel() for p in sampled.parameters() if p.data_ptr() not in ptrs)
    assert new == sum(p.numel() for p in sampled.member_parameters().values())
    assert sampled.base_fingerprint == ens.base_fingerprint

    # an ordinary LoraEnsemble downstream: member(m), save_pretrained / from_pretrained
    with torch.no_grad():
        assert torch.allclose(call(sampled.member(4), batch), call(sampled, batch)[4], atol=1e-5)
    sampled.save_pretrained(tmp_path / "sampled")
    fresh, _ = build("bert")
    loaded = LoraEnsemble.from_pretrained(fresh, tmp_path / "sampled").eval()
    with torch.no_grad():
        assert torch.allclose(call(loaded, batch), call(sampled, batch), atol=1e-6)


def test_an_ensemble_of_another_rank_on_the_same_backbone_holds_the_mean_of_two_updates():
    # ensemble_like(ens, M, r=2r): rank-2r adapters on ens's frozen tensors at ens's scaling s (lora_alpha / r, not
    # lora_alpha / 2r); A = [A1; A2], B = [B1, B2] / 2 make s B A = s (B1 A1 + B2 A2) / 2, the mean of two updates
    # (benchmarks/swa_mean_gap.py's mean_dW); zero second factors give back ens's members exactly
    model, make_batch = build("bert", 0)
    ens = LoraEnsemble(model, num_members=3, r=2, lora_alpha=4.0).eval()  # s = 2
    perturb(ens, 0.05, seed=1)
    params = {n: p.detach().clone() for n, p in ens.member_parameters().items()}
    wide = ensemble_like(ens, 3, r=4).eval()
    assert wide.ensemble_config.r == 4 and ens.ensemble_config.r == 2
    assert {t.data_ptr() for t in frozen_tensors(wide)} <= {t.data_ptr() for t in frozen_tensors(ens)}
    padded = {n: torch.cat([p, torch.zeros_like(p)], dim=1 if n.endswith("lora_A") else 2) if "lora_" in n else p
              for n, p in params.items()}
    wide.load_member_state(padded)
    batch = make_batch(4, torch.Generator().manual_seed(0))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.allclose(call(wide, batch), call(ens, batch), atol=1e-6)
            for m in range(3):
                assert torch.allclose(call(wide.member(m), batch), call(wide, batch)[m], atol=1e-5)
                assert torch.allclose(call(wide.member(m), batch), call(ens, batch)[m], atol=1e-5)

    other = {n: p + 0.1 * torch.randn_like(p) for n, p in params.items()}
    wide.load_member_state({n: torch.cat([p, other[n]], dim=1) if n.endswith("lora_A") else
                            torch.cat([p, other[n]], dim=2) / 2 if n.endswith("lora_B") else p
                            for n, p in params.items()})
    layers = [(n, mod) for n, mod in wide.model.named_modules() if hasattr(mod, "delta_weight")]
    assert layers
    for name, layer in layers:
        A, B = params[f"{name}.lora_A"], params[f"{name}.lora_B"]
        A2, B2 = other[f"{name}.lora_A"], other[f"{name}.lora_B"]
        for m in range(3):
            assert torch.allclose(layer.delta_weight(m), 2.0 * (B[m] @ A[m] + B2[m] @ A2[m]) / 2, atol=1e-6)


def test_member_chunks_give_the_sampled_ensembles_logits():
    ens, make_batch = ensemble("plain")
    post = LoraPosterior(ens, rank=2)
    for i in range(3):
        perturb(ens, 0.1, seed=i)
        post.collect()
    batches = [labelled(make_batch(4, torch.Generator().manual_seed(s)), 4, seed=s)[0] for s in range(2)]
    logits, labels = post.member_logits(batches, 4, seed=2, member_chunk_size=5)  # 12 members: 5 + 5 + 2
    with torch.no_grad():
        sampled = post.sample(4, seed=2)
        full = torch.cat([call(sampled, b[:1] if isinstance(b, tuple) else b) for b in batches], dim=1)
    assert logits.shape == (12, 8, NUM_LABELS)
    assert torch.allclose(logits, full, atol=1e-6)
    assert torch.equal(labels, torch.cat([b[1] if isinstance(b, tuple) else b["labels"] for b in batches]))
    with pytest.raises(ValueError, match="member_chunk_size must be an integer >= 1"):
        post.member_logits(batches, 4, member_chunk_size=0)


# ---- TFB -----------------------------------------------------------------------------------------------
def test_tfb_sigma_keeps_the_anchor_nll_increase_under_the_threshold_and_a_larger_one_does_not(tmp_path):
    ens, make_batch = ensemble("bert")
    perturb(ens, 0.05, seed=1)
    ens.save_pretrained(tmp_path / "ens")
    fresh, _ = build("bert")
    loaded = LoraEnsemble.from_pretrained(fresh, tmp_path / "ens").eval()  # a finished ensemble, loaded
    anchors = labelled(make_batch(16, torch.Generator().manual_seed(3)), 16)
    post = LoraPosterior(loaded, method="tfb")
    eps = 0.003
    cal = post.calibrate(anchors, max_nll_increase=eps)
    assert torch.all(cal.sigma > 0) and torch.all(torch.isfinite(cal.sigma_upper))
    assert torch.all(cal.sigma_upper / cal.sigma - 1 < 1e-3)
    assert torch.all(post.nll_increase(anchors, cal.sigma) <= eps)          # recomputed on a fresh twin
    assert torch.all(post.nll_increase(anchors, cal.sigma_upper) > eps)

    # draws: noise on the A matrices only, sigma_m * scale
    K = 400
    drawn = post.draw(range(K), K, scale=2.0)
    for name, p in loaded.member_parameters().items():
        if name.endswith("lora_A"):
            std = (drawn[name].double() - p[0].double()).std()
            assert abs(std / (2.0 * cal.sigma[0]) - 1) < 0.05
        else:
            assert torch.equal(drawn[name], p[:1].expand_as(drawn[name])), name
    batch = make_batch(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(call(post.sample(2, scale=0.0), batch), call(loaded, batch).repeat_interleave(2, dim=0))


# ---- files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["swag", "tfb"])
def test_a_saved_posterior_loads_onto_the_base_model_and_samples_the_same(tmp_path, method):
    ens, make_batch = ensemble("bert")
    perturb(ens, 0.05, seed=1)
    post = LoraPosterior(ens, method=method, rank=3)
    batch = make_batch(4, torch.Generator().manual_seed(0))
    if method == "swag":
        for i in range(4):
            perturb(ens, 0.05, seed=5 + i)
            post.collect()
    else:
        post.calibrate(labelled(batch, 4), steps=5)
    post.save_pretrained(tmp_path / "post")
    fresh, _ = build("bert")
    loaded = LoraPosterior.from_pretrained(fresh, tmp_path / "post")
    assert (loaded.method, loaded.rank, loaded.num_collected) == (method, 3, post.num_collected)
    again = LoraPosterior.from_pretrained(ens, tmp_path / "post")  # onto the ensemble itself
    with torch.no_grad():
        expected = call(post.sample(3, seed=4).eval(), batch)
        assert torch.equal(call(loaded.sample(3, seed=4).eval(), batch), expected)
        assert torch.equal(call(again.sample(3, seed=4).eval(), batch), expected)


# ---- errors ---------------------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_errors_are_one_clear_line(tmp_path):
    ens, make_batch = ensemble("plain")
    with pytest.raises(ValueError, match="include_heads=True is for SWAG: TFB perturbs the A matrices alone"):
        LoraPosterior(ens, method="tfb", include_heads=True)
    with pytest.raises(ValueError, match="include_heads must be True, False or None"):
        LoraPosterior(ens, method="swag", include_heads="no")
    with pytest.raises(RuntimeError, match=r"call post.collect\(\) at least once") as e:
        LoraPosterior(ens, method="swag").sample(2)
    one_line(e)
    with pytest.raises(RuntimeError, match=r"call post.calibrate\(anchor_batches\) first") as e:
        LoraPosterior(ens, method="tfb").sample(2)
    one_line(e)
    post = LoraPosterior(ens)
    post.collect()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1") as e:
            post.sample(bad)
        one_line(e)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        post.sample(2, scale=-1.0)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match=r"rank \(the number of SWAG deviations kept\) must be an integer >= 1"):
            LoraPosterior(ens, rank=bad)
    with pytest.raises(ValueError, match=r"unknown posterior method 'laplace'; methods: \['swag', 'tfb'\]") as e:
        LoraPosterior(ens, method="laplace")
    one_line(e)
    with pytest.raises(ValueError, match="collect\\(\\) builds SWAG moments; this posterior is method='tfb'"):
        LoraPosterior(ens, method="tfb").collect()
    with pytest.raises(ValueError, match="calibrate\\(\\) finds TFB's sigma; this posterior is method='swag'"):
        post.calibrate([])
    with pytest.raises(TypeError, match="LoraPosterior needs a LoraEnsemble, got Linear"):
        LoraPosterior(torch.nn.Linear(2, 2))

    post.save_pretrained(tmp_path / "post")
    other, _ = build("bert")
    with pytest.raises(ValueError, match="load it onto the base model it was trained on") as e:
        LoraPosterior.from_pretrained(other, tmp_path / "post")
    one_line(e)
    with pytest.raises(ValueError, match="load it onto the base model it was trained on"):
        LoraPosterior.from_pretrained(LoraEnsemble(other, num_members=3, r=2), tmp_path / "post")
    with pytest.raises(FileNotFoundError, match="posterior_config.json not found"):
        LoraPosterior.from_pretrained(build("plain")[0], tmp_path)


def test_the_sampled_ensemble_runs_the_shared_trunk_and_exports_to_peft(tmp_path):
    from lora_ensemble import export_peft, from_peft

    model, make_batch = build("bert")
    ens = LoraEnsemble(model, num_members=2, r=2, layers=[-1], share_trunk=True).eval()
    perturb(ens, 0.05, seed=1)
    post = LoraPosterior(ens, method="tfb")
    batch = make_batch(4, torch.Generator().manual_seed(0))
    post.calibrate(labelled(batch, 4), steps=4)
    sampled = post.sample(3)
    assert sampled.trunk_end == ens.trunk_end  # the trunk before the adapted block runs once on B rows
    with torch.no_grad():
        assert torch.allclose(call(post.sample(3, scale=0.0), batch), call(ens, batch).repeat_interleave(3, 0),
                              atol=1e-6)
        out = call(sampled, batch)
    folders = export_peft(sampled, tmp_path / "peft")
    assert len(folders) == 6
    fresh, _ = build("bert")
    back = from_peft(fresh, folders).eval()
    with torch.no_grad():
        assert torch.allclose(call(back, batch), out, atol=1e-5)
