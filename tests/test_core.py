"""The core promise on every supported model family: wrap, run all members at once, get each member back."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, build, call

from lora_ensemble import LoraEnsemble, LoraEnsembleConfig
from lora_ensemble.core.layers import LoraEnsembleFusedLinear, LoraEnsembleLinear, linear_features

M = 3


def make_ensemble(family: str, **overrides) -> tuple[LoraEnsemble, callable]:
    model, make_batch = build(family)
    cfg = LoraEnsembleConfig(num_members=M, r=2, init_gain=1.0, **overrides)
    ens = LoraEnsemble(model, cfg).eval()
    # B starts at zero; give every member a distinct non-zero delta so the tests below can fail.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ens.member_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ens, make_batch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_member_equals_its_slice_of_the_ensemble(family):
    ens, make_batch = make_ensemble(family)
    batch = make_batch(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = call(ens, batch)
        assert out.shape[:2] == (M, 4)
        members = [call(ens.member(m).eval(), batch) for m in range(M)]
    for m in range(M):
        assert type(ens.member(m)) is type(ens.model)
        torch.testing.assert_close(members[m], out[m], atol=2e-5, rtol=1e-4)
    # the members really differ, so the check above could fail
    assert (members[0] - members[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_on_one_member_reaches_only_that_members_parameters(family):
    ens, make_batch = make_ensemble(family)
    out = call(ens, make_batch(2, torch.Generator().manual_seed(0)))
    out[1].float().pow(2).mean().backward()
    params = ens.member_parameters()
    assert params
    touched = 0
    for name, p in params.items():
        assert p.grad is not None, name
        for m in (0, 2):
            assert torch.count_nonzero(p.grad[m]) == 0, f"{name}: member {m} got gradient from member 1's loss"
        touched += int(torch.count_nonzero(p.grad[1]) > 0)
    assert touched > 0


@pytest.mark.parametrize("family", ["bert", "timm_vit", "torchvision_vit", "gpt2_lm"])
def test_backbone_stays_frozen_and_bit_identical_after_training_steps(family):
    ens, make_batch = make_ensemble(family)
    ens.train()
    frozen = {n: p.detach().clone() for n, p in ens.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(ens.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        out = call(ens, make_batch(2, torch.Generator().manual_seed(step)))
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in ens.named_parameters():
        if n in frozen:
            assert p.grad is None
            assert torch.equal(p, frozen[n]), n
    assert set(frozen) and all(p.requires_grad for p in ens.member_parameters().values())


def _expected_trainable(model, ens: LoraEnsemble) -> int:
    """M x (adapters + heads), counted from the original modules."""
    cfg = ens.ensemble_config
    per_member = 0
    for name in ens.target_names:
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.MultiheadAttention):
            E = module.embed_dim
            per_member += len(cfg.fused_parts if cfg.target_modules not in ("qv", "qkv", "qkvo") else "qkv") * cfg.r * (E + E)
            per_member += cfg.r * (E + E)  # out_proj (qkvo preset)
            continue
        fin, fout = linear_features(module)
        if name.rsplit(".", 1)[-1] in ("qkv", "c_attn"):
            per_member += 3 * cfg.r * (fin + fout // 3)
        else:
            per_member += cfg.r * (fin + fout)
    for name in ens.head_names:
        per_member += sum(p.numel() for p in model.get_submodule(name).parameters())
    return cfg.num_members * per_member


@pytest.mark.parametrize("family", ["bert", "distilbert", "timm_vit", "torchvision_vit", "gpt2_lm", "plain"])
def test_trainable_parameter_count_is_members_times_adapters_plus_head(family):
    original, _ = build(family)
    ens, _ = make_ensemble(family)
    trainable = sum(p.numel() for p in ens.parameters() if p.requires_grad)
    assert trainable == _expected_trainable(original, ens)
    assert trainable == sum(p.numel() for p in ens.member_parameters().values())
    # frozen weights exist once: total = frozen backbone (without the replaced heads) + trainable
    frozen_original = sum(p.numel() for p in original.parameters()) - sum(
        p.numel() for n in ens.head_names for p in original.get_submodule(n).parameters())
    assert sum(p.numel() for p in ens.parameters()) == frozen_original + trainable


@pytest.mark.parametrize("family", ["bert", "timm_swin", "torchvision_vit", "llama_lm"])
def test_save_and_load_round_trip_reproduces_outputs(family, tmp_path):
    ens, make_batch = make_ensemble(family)
    batch = make_batch(3, torch.Generator().manual_seed(0))
    ens.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapter_model.safetensors", "lora_ensemble_config.json"]
    fresh, _ = build(family)
    loaded = LoraEnsemble.from_pretrained(fresh, tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, batch), call(ens, batch))
    # only per-member tensors are written, not the frozen backbone
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in ens.member_parameters().values())


@pytest.mark.parametrize("family", ["bert", "timm_vit", "torchvision_vit", "plain", "llama_cls"])
def test_a_samples_prediction_does_not_depend_on_the_rest_of_the_batch(family):
    ens, make_batch = make_ensemble(family)
    batch = make_batch(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = call(ens, batch)
        for i in range(4):
            alone = batch[0][i:i + 1] if isinstance(batch, tuple) else {k: v[i:i + 1] for k, v in batch.items()}
            alone = (alone,) if isinstance(batch, tuple) else alone
            torch.testing.assert_close(call(ens, alone)[:, 0], together[:, i], atol=1e-5, rtol=1e-4)


def test_presets_and_layers_choose_the_documented_projections():
    model, _ = build("bert")
    qv = LoraEnsemble(model, num_members=2, target_modules="qv", layers=[-1])
    assert qv.target_names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    model, _ = build("timm_vit")
    ens = LoraEnsemble(model, num_members=2, target_modules=["qkv"], fused_parts=["q", "v"])
    layer = ens.model.get_submodule("blocks.0.attn.qkv")
    assert layer.parts == ["q", "v"] and layer.lora_A.shape == (2, 2, 8, 32)
    model, _ = build("gpt2_lm")
    ens = LoraEnsemble(model, num_members=2, target_modules="all-linear")
    assert "lm_head" not in ens.target_names and any(n.endswith("mlp.c_fc") for n in ens.target_names)
    assert ens.head_names == []  # causal LM: the vocabulary head is never replicated by default
    model, _ = build("bert")
    ens = LoraEnsemble(model, num_members=2, target_modules=r".*layer\.0\.attention\.self\.(query|key)")
    assert len(ens.target_names) == 2


def test_members_start_from_different_draws_and_the_seed_reproduces_them():
    a = LoraEnsemble(build("bert")[0], num_members=2, seed=1).member_parameters()
    b = LoraEnsemble(build("bert")[0], num_members=2, seed=1).member_parameters()
    c = LoraEnsemble(build("bert")[0], num_members=2, seed=2).member_parameters()
    name = "bert.encoder.layer.0.attention.self.query.lora_A"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert not torch.equal(a[name][0], a[name][1])
    assert torch.count_nonzero(a[name.replace("lora_A", "lora_B")]) == 0
    # paper init: xavier uniform, gain 10: bound = 10 * sqrt(6 / (in + r))
    bound = 10 * (6 / (32 + 8)) ** 0.5
    assert a[name].abs().max() <= bound and a[name].abs().max() > 0.8 * bound


def test_config_round_trips_through_json_and_rejects_unknown_fields(tmp_path):
    cfg = LoraEnsembleConfig(num_members=5, r=4, lora_alpha=8, target_modules=["query", "value"], layers=[0, -1])
    cfg.to_json(tmp_path / "c.json")
    assert LoraEnsembleConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.scaling == 2.0 and LoraEnsembleConfig().scaling == 1.0
    with pytest.raises(ValueError, match="unknown LoraEnsembleConfig field.*'rank'"):
        LoraEnsembleConfig.from_dict({"rank": 4})


@pytest.mark.parametrize("bad, message", [
    ({"num_members": 0}, "num_members must be an integer >= 1"),
    ({"r": 0}, "r must be an integer >= 1"),
    ({"init": "uniform"}, "init must be one of"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"fused_parts": ["q", "x"]}, "fused_parts"),
])
def test_invalid_config_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraEnsembleConfig(**bad)


def test_unknown_target_modules_list_the_linear_layers_that_exist():
    with pytest.raises(ValueError, match=r"matches no module.*encoder\.layer\.\*\.attention\.self\.query"):
        LoraEnsemble(build("bert")[0], num_members=2, target_modules=["q_proj"])


def test_missing_head_is_an_error_unless_head_none():
    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.query(x)

    with pytest.raises(ValueError, match="no classification head found.*head=None"):
        LoraEnsemble(NoHead(), num_members=2, target_modules=["query"])
    ens = LoraEnsemble(NoHead(), num_members=2, target_modules=["query"], head=None)
    assert ens(torch.randn(3, 4)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="head 'clf' is not a submodule"):
        LoraEnsemble(NoHead(), num_members=2, target_modules=["query"], head="clf")


def test_inconsistent_batch_sizes_and_bad_member_index_are_named():
    ens, _ = make_ensemble("bert")
    with pytest.raises(ValueError, match="'attention_mask' has leading dimension 3.*batch size \\(from 'input_ids'\\) is 2"):
        ens(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(IndexError, match=r"member index must be an integer in 0..2, got 3"):
        ens.member(3)
    with pytest.raises(ValueError, match="already carries LoRA-Ensemble adapters"):
        LoraEnsemble(ens.model, num_members=2)


def test_loading_onto_another_base_model_fails_clearly(tmp_path):
    ens, _ = make_ensemble("bert")
    ens.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved for base model .*BertForSequenceClassification.*class or parameter shapes differ"):
        LoraEnsemble.from_pretrained(build("roberta")[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere"):
        LoraEnsemble.from_pretrained(build("bert")[0], tmp_path / "nowhere")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LoraEnsemble.from_pretrained(build("bert")[0], tmp_path)
    meta = json.loads((tmp_path / "lora_ensemble_config.json").read_text())
    assert meta["base_model"]["class"].endswith("BertForSequenceClassification")


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    ens, make_batch = make_ensemble("bert")
    batch = make_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = call(ens, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = call(ens, batch)
    assert low.shape == ref.shape
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("family", ["bert", "timm_vit", "llama_lm", "timm_swin"])
def test_shared_trunk_gives_the_same_outputs_and_gradients_as_the_plain_path(family):
    outputs, grads = {}, {}
    for share in (False, True):
        ens, make_batch = make_ensemble(family, layers=[-1], share_trunk=share)
        batch = make_batch(3, torch.Generator().manual_seed(0))
        out = call(ens, batch)
        out.float().pow(2).mean().backward()
        outputs[share] = out.detach()
        grads[share] = {n: p.grad.clone() for n, p in ens.member_parameters().items()}
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-4)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_trunk_runs_early_blocks_on_the_original_rows_only():
    ens, make_batch = make_ensemble("bert", layers=[-1], share_trunk=True)
    rows = {}
    for name in ("bert.encoder.layer.0", "bert.encoder.layer.1"):
        ens.model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: rows.__setitem__(name, (out[0] if isinstance(out, tuple) else out).shape[0]))
    call(ens, make_batch(2, torch.Generator().manual_seed(0)))
    assert rows == {"bert.encoder.layer.0": 2, "bert.encoder.layer.1": 2 * M}
    assert ens.member(0) is not None and not ens.member(0).bert.encoder.layer[1]._forward_pre_hooks


def test_saved_files_get_the_usual_permissions_and_fused_layers_hold_no_extra_buffers(tmp_path):
    import os

    ens, _ = make_ensemble("timm_vit", target_modules=["qkv"], fused_parts=["q", "v"])
    ens.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    layer = ens.model.get_submodule("blocks.0.attn.qkv")
    assert list(layer.buffers()) == []


@pytest.mark.parametrize("family,overrides", [("bert", {}), ("gpt2_lm", {}), ("timm_vit", {}),
                                              ("timm_vit", {"target_modules": ["qkv"], "fused_parts": ["q", "v"]})])
def test_inference_adds_the_deltas_in_place_and_gives_the_training_path_outputs(family, overrides):
    ens, make_batch = make_ensemble(family, **overrides)
    batch = make_batch(3, torch.Generator().manual_seed(0))
    with_grad = call(ens, batch)
    with torch.no_grad():
        without = call(ens, batch)
    torch.testing.assert_close(without, with_grad.detach(), atol=1e-6, rtol=1e-5)


def test_the_fused_training_function_matches_autograd():
    from lora_ensemble.core.layers import _LinearWithMemberDeltas

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 2, 4, dtype=torch.double, generator=g, requires_grad=True)
    for slices, K in [((0,), 1), ((0, 1, 2), 3), ((0, 2), 3)]:
        d = 5
        W, b = torch.randn(K * d, 4, dtype=torch.double, generator=g), torch.randn(K * d, dtype=torch.double, generator=g)
        A = torch.randn(3, len(slices), 2, 4, dtype=torch.double, generator=g, requires_grad=True)
        B = torch.randn(3, len(slices), d, 2, dtype=torch.double, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, A, B: _LinearWithMemberDeltas.apply(x, W, b, A, B, 0.5, 3, slices, K), (x, A, B))


@pytest.mark.parametrize("make", [
    lambda: LoraEnsembleLinear(torch.nn.Linear(4, 6), 3, r=2, scaling=0.5),
    lambda: LoraEnsembleFusedLinear(torch.nn.Linear(4, 6), ["q", "k", "v"], 3, r=2, scaling=1.0),
    lambda: LoraEnsembleFusedLinear(torch.nn.Linear(4, 6), ["q", "v"], 3, r=2, scaling=0.5),
], ids=["linear", "fused_qkv", "fused_qv"])
def test_the_fused_training_path_equals_the_generic_path(make):
    from lora_ensemble.core.layers import _fused_training

    grads = {}
    for generic in (False, True):
        torch.manual_seed(1)
        layer = make()
        with torch.no_grad():
            for p in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B):
                p.normal_()
        layer.base_layer.requires_grad_(False)
        if generic:  # a hook on the frozen layer sends the layer down the generic path
            layer.base_layer.register_forward_hook(lambda *a: None)
        assert _fused_training(layer, torch.zeros(6, 7, 4)) is not generic
        xs = torch.randn(6, 7, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = layer(xs)
        out.pow(2).sum().backward()
        grads[generic] = (out.detach(), xs.grad, layer.lora_A.grad, layer.lora_B.grad)
    for fused, generic in zip(grads[False], grads[True]):
        torch.testing.assert_close(fused, generic, atol=1e-5, rtol=1e-5)
