"""Ensembles and PEFT LoRA adapters, both ways, checked against the real `peft` package."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import build, call

from lora_ensemble import LoraEnsemble, export_peft, from_peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lora_ensemble.core.batch import MemberModule  # noqa: E402

M = 3
ATOL = dict(atol=2e-5, rtol=1e-4)


def random_ensemble(family: str, **config) -> tuple[LoraEnsemble, callable]:
    model, make_batch = build(family)
    ens = LoraEnsemble(model, num_members=M, r=2, init_gain=1.0, **config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B starts at zero: give every member a distinct delta
        for name, p in ens.member_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ens, make_batch


def train_peft(family: str, folder: str, seed: int, steps: int = 3, **lora) -> tuple[PeftModel, callable]:
    """A PEFT LoRA model trained separately for a few optimizer steps, saved to `folder`."""
    model, make_batch = build(family)
    pm = get_peft_model(model, LoraConfig(**lora))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(seed)
    pm.train()
    for _ in range(steps):
        loss = -call(pm, make_batch(4, g)).log_softmax(-1)[..., seed % 3].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval().save_pretrained(folder)
    return pm, make_batch


def untouched(model) -> bool:
    return not any(isinstance(m, MemberModule) for m in model.modules())


# ---- ensemble -> PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family, config", [
    ("bert", dict(target_modules="qkvo")),                       # q/k/v/o + classifier head
    ("timm_vit", dict(target_modules="qv", lora_alpha=4.0)),     # fused qkv, 2 of 3 parts, alpha != r
    ("gpt2_lm", dict(target_modules="qkvo")),                    # Conv1D c_attn (fused) + c_proj
    ("llama_lm", dict(target_modules="qkvo")),                   # no head
    ("torchvision_vit", dict(target_modules="qkv")),            # nn.MultiheadAttention in-projection
])
def test_each_exported_member_loads_in_peft_with_the_same_outputs(tmp_path, family, config):
    ens, make_batch = random_ensemble(family, **config)
    folders = export_peft(ens, tmp_path / "peft")
    assert folders == [str(tmp_path / "peft" / f"member_{m}") for m in range(M)]
    batch = make_batch(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = call(ens, batch)
        for m, folder in enumerate(folders):
            assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
            base, _ = build(family)
            peft_out = call(PeftModel.from_pretrained(base, folder).eval(), batch)
            torch.testing.assert_close(peft_out, out[m], **ATOL)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_exported_config_maps_rank_alpha_targets_and_head(tmp_path):
    ens, _ = random_ensemble("timm_vit", target_modules="qv", lora_alpha=4.0)   # s = 4 / 2 = 2
    folder = export_peft(ens, tmp_path / "peft")[0]
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 2, 4)
    assert cfg["target_modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert cfg["rank_pattern"] == {"blocks.0.attn.qkv": 4, "blocks.1.attn.qkv": 4}     # P * r, q and v parts
    assert cfg["alpha_pattern"] == {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 8}    # s * P * r
    assert cfg["modules_to_save"] == ["head"]
    ens_none, _ = random_ensemble("bert", target_modules="qv")                   # lora_alpha=None: s = 1
    cfg = json.loads(open(os.path.join(export_peft(ens_none, tmp_path / "b")[0], "adapter_config.json")).read())
    assert cfg["lora_alpha"] == cfg["r"] == 2 and cfg["rank_pattern"] == {}


def test_export_is_atomic_and_never_overwrites_silently(tmp_path, monkeypatch):
    ens, _ = random_ensemble("bert", target_modules="qv")
    target = tmp_path / "peft"
    import lora_ensemble.interop.peft as interop

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = interop.safetensors_save
    monkeypatch.setattr(interop, "safetensors_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_peft(ens, target)
    assert os.listdir(tmp_path) == []                     # no half export, no temporary folder left
    monkeypatch.setattr(interop, "safetensors_save", real_save)

    export_peft(ens, target)
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft(ens, target)
    assert (target / "keep.txt").exists()
    export_peft(ens, target, overwrite=True)                # replaces the export, leaves the user's file alone
    assert sorted(os.listdir(target)) == ["keep.txt"] + [f"member_{m}" for m in range(M)]
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_export_into_an_empty_or_unrelated_folder_works_like_save_pretrained(tmp_path):
    import tempfile

    ens, _ = random_ensemble("bert", target_modules="qv")
    with tempfile.TemporaryDirectory(dir=tmp_path) as empty:      # what users pass to save_pretrained
        mode = os.stat(empty).st_mode
        folders = export_peft(ens, empty)
        assert sorted(os.listdir(empty)) == [f"member_{m}" for m in range(M)]
        assert folders == [os.path.join(empty, f"member_{m}") for m in range(M)]
        assert os.stat(empty).st_mode == mode                      # still the user's folder, same permissions
    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    folders = export_peft(ens, other)
    assert sorted(os.listdir(other)) == ["member_0", "member_1", "member_2", "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["project"]            # no temporary folder left beside it
    model, make_batch = build("bert")
    reloaded = from_peft(model, folders).eval()
    batch = make_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(call(reloaded, batch), call(ens, batch), **ATOL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_peft(ens, tmp_path / "file")


def test_export_refuses_multihead_attention_out_proj_which_peft_applies_twice(tmp_path):
    ens, _ = random_ensemble("torchvision_vit", target_modules="qkvo")
    with pytest.raises(ValueError, match="out_proj.*twice"):
        export_peft(ens, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---- PEFT -> ensemble ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family, adapters", [
    ("bert", [dict(r=2, lora_alpha=4, target_modules=["query", "key", "value"], modules_to_save=["classifier"]),
              dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["query", "key", "value"],
                   modules_to_save=["classifier"], rank_pattern={"layer.0.attention.self.key": 5},
                   alpha_pattern={"value": 3}),
              dict(r=3, target_modules=["query", "key", "value"], modules_to_save=["classifier"])]),
    ("timm_vit", [dict(r=2, lora_alpha=2, target_modules=["qkv"], modules_to_save=["head"]),
                  dict(r=3, lora_alpha=12, target_modules=["qkv"], modules_to_save=["head"])]),
    ("gpt2_lm", [dict(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                 dict(r=1, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)]),
])
def test_separately_trained_peft_adapters_become_one_ensemble(tmp_path, family, adapters):
    folders = [str(tmp_path / f"a{i}") for i in range(len(adapters))]
    peft_models = [train_peft(family, f, seed=i, **lora)[0] for i, (f, lora) in enumerate(zip(folders, adapters))]
    base, make_batch = build(family)
    ens = from_peft(base, folders).eval()
    ranks = [r for a in adapters for r in (a["r"], *a.get("rank_pattern", {}).values())]
    assert (ens.num_members, ens.ensemble_config.r, ens.ensemble_config.scaling) == (len(adapters), max(ranks), 1.0)
    batch = make_batch(4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = call(ens, batch)
        for i, pm in enumerate(peft_models):
            torch.testing.assert_close(out[i], call(pm, batch), **ATOL)
            torch.testing.assert_close(call(ens.member(i).eval(), batch), call(pm, batch), **ATOL)
    assert (out[0] - out[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family, config", [("timm_vit", dict(target_modules="qv")),
                                            ("torchvision_vit", dict(target_modules="qkv")),
                                            ("bert", dict(target_modules="qkvo", lora_alpha=8.0))])
def test_export_then_from_peft_gives_back_the_ensemble(tmp_path, family, config):
    ens, make_batch = random_ensemble(family, **config)
    folders = export_peft(ens, tmp_path / "peft")
    back = from_peft(build(family)[0], folders).eval()
    batch = make_batch(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(call(back, batch), call(ens, batch), **ATOL)


# ---- bad input: a clear error naming the file, and the model untouched --------------------------------------
@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_adapters")
    folders = [str(root / f"a{i}") for i in range(2)]
    for i, f in enumerate(folders):
        train_peft("bert", f, seed=i, steps=1, r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    return folders


def copy_adapter(src: str, dst) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return str(dst)


def assert_refused(model, folders, error, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        from_peft(model, folders)
    assert untouched(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapters_with_different_targets_are_refused_naming_the_mismatch(tmp_path, bert_adapters):
    other = str(tmp_path / "other")
    train_peft("bert", other, seed=5, steps=1, r=2, target_modules=["query", "key"], modules_to_save=["classifier"])
    assert_refused(build("bert")[0], [bert_adapters[0], other], ValueError,
                   rf"{other}.*targets different modules.*attention\.self\.(key|value)")


def test_adapters_for_another_base_model_are_refused(bert_adapters):
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=50, num_labels=3))
    file = os.path.join(bert_adapters[0], "adapter_model.safetensors")
    assert_refused(wider, bert_adapters, ValueError, rf"{file}.*another base model")
    assert_refused(build("roberta")[0], bert_adapters, ValueError, rf"{file}.*do not fit this model")


def test_missing_and_corrupted_files_are_refused_naming_the_file(tmp_path, bert_adapters):
    broken = copy_adapter(bert_adapters[1], tmp_path / "missing")
    os.remove(os.path.join(broken, "adapter_model.safetensors"))
    assert_refused(build("bert")[0], [bert_adapters[0], broken], FileNotFoundError,
                   rf"{broken}/adapter_model.safetensors not found")
    no_config = copy_adapter(bert_adapters[1], tmp_path / "no_config")
    os.remove(os.path.join(no_config, "adapter_config.json"))
    assert_refused(build("bert")[0], [bert_adapters[0], no_config], FileNotFoundError,
                   rf"{no_config}/adapter_config.json not found")
    corrupt = copy_adapter(bert_adapters[1], tmp_path / "corrupt")
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 64)
    assert_refused(build("bert")[0], [bert_adapters[0], corrupt], ValueError,
                   rf"{corrupt}/adapter_model.safetensors is not a readable safetensors file")


def test_lora_variants_and_derived_overrides_are_refused(tmp_path, bert_adapters):
    dora = copy_adapter(bert_adapters[1], tmp_path / "dora")
    path = os.path.join(dora, "adapter_config.json")
    cfg = json.loads(open(path).read())
    cfg["use_dora"] = True
    with open(path, "w") as f:
        json.dump(cfg, f)
    assert_refused(build("bert")[0], [bert_adapters[0], dora], ValueError, rf"{path}: use_dora=True is not supported")
    with pytest.raises(ValueError, match=r"\['r'\] are decided by the adapters"):
        from_peft(build("bert")[0], bert_adapters, r=8)


def test_peft_multihead_attention_adapter_with_out_proj_is_refused(tmp_path):
    folder = str(tmp_path / "mha")
    train_peft("torchvision_vit", folder, seed=0, steps=0, r=2, target_modules=["self_attention"],
               init_lora_weights=False)  # random non-zero B
    assert_refused(build("torchvision_vit")[0], [folder], ValueError, r"out_proj.*not zero.*twice")
