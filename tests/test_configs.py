"""The committed configs: every one loads, the offline default is the demo's run, and each paper recipe trains.

A user points a recipe at their data (`--set data.root=...`); here the data are a few tiny files in the
dataset's own layout and the model a tiny random stand-in of the same modality, for one training step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import yaml
from test_data_audio import write_esc50
from test_data_images import write_cifar10, write_cifar100, write_ham10000
from test_data_text import write_sst2

from lora_ensemble.app.compare import method_config, preflight, read_compare_config
from lora_ensemble.app.demo import DEFAULT_RUN, demo_runs
from lora_ensemble.app.run_config import load_run_config
from lora_ensemble.app.runner import fit
from lora_ensemble.methods import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMPARE = "compare_bbc_minilm.yaml"
RUN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != COMPARE)

# recipe -> (tiny model, writer of tiny data in the dataset's layout; returns data.root)
PAPER_RECIPES = {
    "vit_b32_cifar10.yaml": ("tiny:image", lambda root: write_cifar10(root, per_batch=10)),
    "vit_b32_cifar100.yaml": ("tiny:image", lambda root: write_cifar100(root, n=100)),
    "vit_b32_ham10000.yaml": ("tiny:image", lambda root: write_ham10000(root, lesions_per_class=5) and root),
    "ast_esc50.yaml": ("tiny:audio", lambda root: write_esc50(root) or root),
    "sst2_minilm.yaml": ("tiny:text", lambda root: write_sst2(root)),
}


def test_configs_folder_holds_the_documented_recipes():
    assert set(RUN_CONFIGS) == set(PAPER_RECIPES) | {"bbc_news_minilm.yaml", "smollm2_bbc_news.yaml",
                                                  "smollm2_bbc_news_mc.yaml"}


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_run_config_loads_and_says_what_it_reproduces(name):
    config = load_run_config(CONFIGS / name)
    assert config.method.name == "lora_ensemble"
    header = (CONFIGS / name).read_text().split("\nseed:")[0]
    assert header.startswith("#") and ("paper" in header.lower())


def test_offline_default_config_is_the_demo_run():
    """The demo trains the committed config (shipped as package data), not a copy of it."""
    committed = yaml.safe_load((CONFIGS / "bbc_news_minilm.yaml").read_text())
    assert DEFAULT_RUN == committed
    ensemble = demo_runs()["lora_ensemble"]
    assert ensemble == committed
    assert demo_runs()["single_lora"]["method"] == {**{k: v for k, v in committed["method"].items() if k != "num_members"},
                                                    "name": "single_lora"}


def test_paper_recipes_keep_the_paper_hyperparameters():
    for name in ("vit_b32_cifar10.yaml", "vit_b32_cifar100.yaml", "vit_b32_ham10000.yaml"):
        c = load_run_config(CONFIGS / name)
        assert c.model.name == "torchvision:vit_b_32" and c.model.pretrained
        assert (c.method.options["num_members"], c.method.options["target_modules"]) == (16, "qkvo")
        assert (c.method.options["init"], c.method.options["init_gain"]) == ("xavier_uniform", 10.0)
        t = c.training
        assert (t.lr, c.data.batch_size, t.warmup_steps, t.grad_clip) == (1e-4, 32, 500, 1.0)
        assert (t.epochs, c.method.options["r"]) == ((65, 4) if "ham" in name else (16, 8))
    assert load_run_config(CONFIGS / "vit_b32_ham10000.yaml").training.class_weights
    esc = load_run_config(CONFIGS / "ast_esc50.yaml")
    assert esc.model.name == "MIT/ast-finetuned-audioset-10-10-0.4593" and esc.method.options["r"] == 16
    assert esc.data.options["test_fold"] == 1


def ensemble_accuracy(member_logits, labels) -> float:
    """Accuracy of the ensemble predictive: argmax of the mean over members of softmax(z_m)."""
    return (member_logits.float().softmax(-1).mean(0).argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_trains_one_step_on_tiny_data(name, tmp_path):
    model, write = PAPER_RECIPES[name]
    root = write(tmp_path / "data")
    config = load_run_config(CONFIGS / name, [
        f"model.name={model}", f"data.root={root}", "data.batch_size=2", "data.eval_batch_size=32",
        "data.num_workers=0", "training.max_steps=1", "training.accelerator=cpu", "training.progress_bar=false",
    ])
    results, run = fit(config, str(tmp_path / "run"))
    member_logits, labels, _ = run.module.last_outputs["test"]
    assert member_logits.shape == (config.method.options["num_members"], len(run.splits.test), run.splits.num_classes)
    assert results["metrics"]["acc"] == pytest.approx(ensemble_accuracy(member_logits, labels))
    assert (tmp_path / "run" / "results.json").is_file()


def test_comparison_default_loads_for_every_method_with_its_own_learning_rate():
    base, per_method = read_compare_config(CONFIGS / COMPARE)
    configs = {m: method_config(base, per_method, m, 0) for m in METHODS}
    lrs = {m: c.training.lr for m, (c, _) in configs.items()}
    assert {m for m, lr in lrs.items() if lr < 1e-3} == {"single", "explicit", "mc_dropout", "snapshot"}
    assert configs["single"][1] == ["init_gain", "r", "target_modules"]  # LoRA options dropped
    assert configs["batch_ensemble"][0].method.options["target_modules"] == "qkvo"
    assert configs["mc_dropout"][0].method.options["dropout"] > 0
    assert all(c.method.options.get("num_members", 4) == 4 for c, _ in configs.values())
    assert configs["explicit"][0].model.kwargs == DEFAULT_RUN["model"]["kwargs"]  # dropout off, as the demo


def test_comparison_default_builds_every_method_on_minilm():
    base, per_method = read_compare_config(CONFIGS / COMPARE)
    errors = {m: preflight(method_config(base, per_method, m, 0)[0]) for m in METHODS}
    assert errors == {m: None for m in METHODS}


def test_vit_recipe_trains_its_own_torchvision_model(tmp_path):
    root = write_cifar10(tmp_path / "data", per_batch=4)
    config = load_run_config(CONFIGS / "vit_b32_cifar10.yaml", [
        "model.pretrained=false", f"data.root={root}", "method.num_members=2", "data.batch_size=2",
        "data.num_workers=0", "training.max_steps=1", "training.accelerator=cpu", "training.progress_bar=false",
    ])
    results, run = fit(config, str(tmp_path / "run"))
    member_logits, labels, _ = run.module.last_outputs["test"]
    assert member_logits.shape == (2, len(run.splits.test), 10)
    assert results["metrics"]["acc"] == pytest.approx(ensemble_accuracy(member_logits, labels))
