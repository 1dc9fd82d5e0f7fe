"""TrunkCache: later epochs replay the frozen trunk's stored outputs; outputs and gradients equal the plain path."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_core import M, make_ensemble
from test_training import tiny_config
from tiny_models import build, call

from lora_ensemble import LoraEnsemble, LoraEnsembleConfig, TrunkCache
from lora_ensemble.app.runner import fit
from lora_ensemble.lightning.samplers import SAMPLE_IDS, IndexedDataset, WithSampleIds

FAMILIES = ["bert", "distilbert", "hf_vit", "ast", "llama_lm", "gpt2_lm", "timm_vit", "timm_swin", "torchvision_vit"]


def _split(batch):
    return (batch, {}) if isinstance(batch, tuple) else ((), batch)


def _forward_backward(fn, batch):
    ens, out = fn(batch)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in ens.member_parameters().items()}
    ens.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_batches_equal_the_plain_path_in_outputs_and_gradients(family):
    plain, make_batch = make_ensemble(family, layers=[-1])
    cached, _ = make_ensemble(family, layers=[-1], share_trunk=True)
    cache = TrunkCache(cached)
    batches = [make_batch(3, torch.Generator().manual_seed(s)) for s in (0, 1)]
    ids = [torch.tensor([4, 0, 7]), torch.tensor([2, 5, 1])]

    # the skipped blocks' own layers must not run on a replayed batch
    calls = []
    for name in cache.skipped_blocks:
        for sub in cached.model.get_submodule(name).modules():
            if any(True for _ in sub.parameters(recurse=False)):
                sub.register_forward_hook(lambda *a: calls.append(1))

    for epoch in range(2):
        for batch, i in zip(batches, ids):
            calls.clear()
            ref = _forward_backward(lambda b: (plain, call(plain, b)), batch)
            args, kwargs = _split(batch)
            got = _forward_backward(lambda b: (cached, cache(i, *args, **kwargs)), batch)
            torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
            for name in ref[1]:
                torch.testing.assert_close(got[1][name], ref[1][name], atol=1e-5, rtol=1e-4, msg=name)
            assert bool(calls) == (epoch == 0), (epoch, i, cache.computed_batches, cache.replayed_batches, len(cache))
    assert (cache.computed_batches, cache.replayed_batches, len(cache)) == (2, 2, 6)


def test_a_batch_with_an_unseen_sample_or_other_input_shapes_runs_the_trunk_again():
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True)
    cache = TrunkCache(ens)
    batch = make_batch(2, torch.Generator().manual_seed(0))
    cache(torch.tensor([0, 1]), **batch)
    cache(torch.tensor([1, 2]), **batch)                       # sample 2 is new
    assert (cache.computed_batches, cache.replayed_batches) == (2, 0)
    cache(torch.tensor([2, 0]), **batch)
    assert cache.replayed_batches == 1
    longer = {k: torch.cat([v, v[:, :3]], dim=1) for k, v in batch.items()}  # another padded length
    with torch.no_grad():
        out = cache(torch.tensor([0, 1]), **longer)
        torch.testing.assert_close(out, call(ens, longer))
    assert (cache.computed_batches, cache.replayed_batches) == (3, 1)
    cache(torch.tensor([0, 1]), **longer)
    assert cache.replayed_batches == 2
    assert len(cache) == 3 and cache.nbytes == (2 * 9 + 6) * 32 * 4  # samples 0, 1 at length 9, sample 2 at 6


def test_one_member_and_autocast_replay_exactly():
    model, make_batch = build("timm_vit")
    ens = LoraEnsemble(model, LoraEnsembleConfig(num_members=1, r=2, layers=[-1], share_trunk=True)).eval()
    cache = TrunkCache(ens)
    (x,) = make_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first, second, plain = cache([3, 4], x), cache([3, 4], x), ens(x)
    assert first.shape[0] == 1 and cache.replayed_batches == 1
    torch.testing.assert_close(first, plain, atol=0, rtol=0)
    torch.testing.assert_close(second, plain, atol=0, rtol=0)


def test_cache_refuses_what_it_cannot_do():
    ens, make_batch = make_ensemble("bert", layers=[-1])
    with pytest.raises(ValueError, match="share_trunk=True"):
        TrunkCache(ens)
    ens, make_batch = make_ensemble("bert", share_trunk=True)  # every block adapted: no trunk
    with pytest.raises(ValueError, match="no trunk to cache"):
        TrunkCache(ens)
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True)
    ens.model.bert.encoder.layer[0].output.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        TrunkCache(ens)
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True)
    ens.model.bert.embeddings.LayerNorm.weight.requires_grad_(True)   # trains before the first adapted block
    with pytest.raises(ValueError, match="requires grad"):
        TrunkCache(ens)([0, 1], **make_batch(2, torch.Generator()))
    cache = TrunkCache(make_ensemble("bert", layers=[-1], share_trunk=True)[0])
    batch = make_batch(2, torch.Generator())
    with pytest.raises(ValueError, match="2 sample_ids for a batch of 3|3 sample_ids for a batch of 2"):
        cache([0, 1, 2], **batch)
    with pytest.raises(ValueError, match="1-D integer"):
        cache(torch.tensor([0.0, 1.0]), **batch)
    with pytest.raises(TypeError, match="LoraEnsemble"):
        TrunkCache(torch.nn.Linear(2, 2))


def test_active_dropout_in_the_trunk_is_reported_once():
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True)
    ens.train()
    cache = TrunkCache(ens)
    with pytest.warns(UserWarning, match="active dropout .*bert.embeddings.dropout"):
        cache([0, 1], **make_batch(2, torch.Generator()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache([2, 3], **make_batch(2, torch.Generator()))


def test_share_trunk_on_a_model_that_never_calls_its_blocks_is_a_clear_error():
    ens, make_batch = make_ensemble("plain", layers=[-1], share_trunk=True)
    with pytest.raises(ValueError, match="never called its block"):
        call(ens, make_batch(2, torch.Generator()))


def test_batches_name_their_samples():
    data = IndexedDataset([("a", 0), ("b", 1), ("c", 0)])
    collate = WithSampleIds(lambda items: {"labels": torch.tensor([y for _, y in items])})
    batch = collate([data[2], data[0]])
    assert batch[SAMPLE_IDS].tolist() == [2, 0] and batch["labels"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="already makes"):
        WithSampleIds(lambda items: {SAMPLE_IDS: 1})([data[0]])


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _cached_config(**changes):
    config = tiny_config(**changes)
    config.model.kwargs = dict(NO_DROPOUT)
    config.method.options.update(layers=[-1], share_trunk=True)
    return config


def test_fit_with_cache_trunk_trains_exactly_like_without(tmp_path):
    from safetensors.torch import load_file

    plain, _ = fit(_cached_config(), str(tmp_path / "plain"))
    cached, _ = fit(_cached_config(training__cache_trunk=True), str(tmp_path / "cached"))
    assert cached["trunk_cache"] == {"computed_batches": 2, "replayed_batches": 2, "samples": 8, "bytes": 8 * 16 * 32 * 4}
    assert "trunk_cache" not in plain and len(cached["train_epoch_times_s"]) == 2
    a, b = (load_file(tmp_path / d / "model" / "weights.safetensors") for d in ("plain", "cached"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)
    assert cached["metrics"]["nll"] == pytest.approx(plain["metrics"]["nll"], rel=1e-5)


def test_cache_trunk_on_a_method_without_a_trunk_is_a_config_error(tmp_path):
    from lora_ensemble.app.run_config import ConfigError
    from lora_ensemble.app.runner import build_run

    with pytest.raises(ConfigError, match="training.cache_trunk: .*share_trunk"):
        build_run(tiny_config(training__cache_trunk=True))
    config = tiny_config(training__cache_trunk=True)
    config.method.name, config.method.options = "mc_dropout", {"num_members": 2}
    with pytest.raises(ConfigError, match="no frozen trunk"):
        build_run(config)


def test_the_first_adapted_block_runs_its_frozen_projections_of_the_block_input_once():
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True, target_modules="qkvo")
    rows = {}
    block = "bert.encoder.layer.1.attention"
    for name in ("self.query", "self.key", "self.value", "output.dense"):
        ens.model.get_submodule(f"{block}.{name}.base_layer").register_forward_hook(
            lambda m, a, out, name=name: rows.__setitem__(name, out.shape[0]))
    call(ens, make_batch(2, torch.Generator()))
    # q, k, v read the block input (the same for every member); o reads member-specific attention outputs
    assert rows == {"self.query": 2, "self.key": 2, "self.value": 2, "output.dense": 2 * M}


def test_a_repeated_input_changed_in_place_is_not_taken_for_its_source():
    from lora_ensemble.core.batch import RowContract, repeat_batch

    contract = RowContract(3)
    x = torch.randn(2, 3)
    (rep,), _ = repeat_batch((x,), {}, 2, 3, contract=contract)
    assert contract.repeat_source(rep) is x
    assert contract.repeat_source(rep.clone()) is None             # only the marked tensor itself
    rep.add_(1)
    assert contract.repeat_source(rep) is None
    (rep,), _ = repeat_batch((x,), {}, 2, 3, contract=contract)
    x.mul_(2)
    assert contract.repeat_source(rep) is None
    (rep,), _ = repeat_batch((torch.randn(2, 3),), {}, 2, 3, contract=contract)
    contract.close()                                                # the marks live for one forward only
    assert contract.repeat_source(rep) is None
    with torch.inference_mode():                                    # no version counters: never shared
        (rep,), _ = repeat_batch((torch.randn(2, 3),), {}, 2, 3, contract=contract)
        assert contract.repeat_source(rep) is None
