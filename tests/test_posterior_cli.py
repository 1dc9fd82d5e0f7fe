"""training.posterior in a run: the Lightning callback collects (or calibrates) and writes <run>/posterior;
`evaluate --samples K` and `predict --samples K` use K draws per member; mistakes are one error line."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from cli_project import make_project

from lora_ensemble import LoraPosterior
from lora_ensemble.app.cli import main
from lora_ensemble.app.run_config import load_run_config


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    make_project(root)  # 12 training rows after the validation split, batch 4: 3 optimizer steps per epoch
    return root


def fit(project, name: str, *overrides: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fit", "--config", str(project / "run.yaml"), "--output-dir", str(project / name),
                     "--set", "training.epochs=2", *overrides])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def swag_run(project):
    code, _ = fit(project, "swag", "training.posterior={method: swag, rank: 2}")
    assert code == 0
    return project / "swag"


def test_a_swag_run_collects_at_every_epoch_end_and_writes_the_posterior(swag_run):
    meta = json.loads((swag_run / "posterior" / "posterior_config.json").read_text())
    assert meta["method"] == "swag" and meta["rank"] == 2 and meta["swag"]["num_collected"] == 2
    assert (swag_run / "posterior" / "posterior.safetensors").is_file()


def test_evaluate_and_predict_with_samples_use_k_draws_per_member(swag_run, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(swag_run), "--samples", "3"]) == 0
    results = json.loads((swag_run / "evaluation_samples_3.json").read_text())
    assert (results["members"], results["trained_members"], results["samples"]) == (6, 2, 3)
    assert 0 <= results["metrics"]["acc"] <= 1 and results["metrics"]["nll"] > 0
    assert "lora_ensemble+swag x3" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(swag_run)]) == 0  # the trained members: other predictions
    trained = json.loads((swag_run / "evaluation.json").read_text())
    assert trained["metrics"]["nll"] != results["metrics"]["nll"]
    chunked_path = tmp_path / "chunked.json"
    assert main(["evaluate", "--checkpoint", str(swag_run), "--samples", "3", "--member-chunk-size", "4",
                 "--output", str(chunked_path)]) == 0  # 6 sampled members: 4 + 2
    chunked = json.loads(chunked_path.read_text())
    assert chunked["member_chunk_size"] == 4 and chunked["members"] == 6
    for key in ("acc", "nll", "ece", "brier", "div/disagreement", "unc/epistemic"):
        assert abs(chunked["metrics"][key] - results["metrics"][key]) < 1e-5, key
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a great and lovely film\nawful, dull and sad\n")
    assert main(["predict", "--checkpoint", str(swag_run), "--input", str(inputs), "--samples", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(row["prediction"] in ("neg", "pos") for row in rows)
    # the same 6 sampled members, 4 + 2 per pass: the same predictions, one of them per input
    assert main(["predict", "--checkpoint", str(swag_run), "--input", str(inputs), "--samples", "3",
                 "--member-chunk-size", "4", "--batch-size", "1"]) == 0
    chunked_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["id"] for r in chunked_rows] == [r["id"] for r in rows]
    for row, chunked_row in zip(rows, chunked_rows):
        assert chunked_row["prediction"] == row["prediction"]
        for key in ("probability", "total", "aleatoric", "epistemic", "p_neg", "p_pos"):
            assert abs(chunked_row[key] - row[key]) < 1e-5, key


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_member_chunks_without_samples_is_one_error_line(swag_run, tmp_path, capsys, command):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a great and lovely film\n")
    extra = ["--input", str(inputs)] if command == "predict" else []
    assert main([command, "--checkpoint", str(swag_run), *extra, "--member-chunk-size", "4"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--member-chunk-size" in err[0] and "needs --samples" in err[0], err


@pytest.mark.parametrize("settings, collected", [
    ("{method: swag, collect_every_n_steps: 2}", 3),     # steps 2, 4, 6 of 6
    ("{method: swag, start_epoch: 1}", 1),               # the second epoch's end only
    ("{method: swag, start_epoch: 1, collect_every_n_steps: 2}", 2),  # steps 4 and 6 (epoch 2 has 4, 5, 6)
])
def test_the_collection_schedule(project, settings, collected):
    name = f"schedule{abs(hash(settings))}"
    code, _ = fit(project, name, f"training.posterior={settings}")
    assert code == 0
    post = LoraPosterior.from_pretrained(*_base_and_folder(project / name))
    assert post.num_collected == collected


def _base_and_folder(run):
    from lora_ensemble.app.runner import load_run

    return load_run(str(run), with_data=False).module.method, run / "posterior"


def test_a_swag_run_without_heads_keeps_the_trained_heads_in_every_draw(project):
    from safetensors.torch import load_file

    code, _ = fit(project, "swag_adapters", "training.posterior={method: swag, rank: 2, include_heads: false}")
    assert code == 0
    folder = project / "swag_adapters" / "posterior"
    assert json.loads((folder / "posterior_config.json").read_text())["include_heads"] is False
    names = {k.split("/", 1)[1] for k in load_file(str(folder / "posterior.safetensors"))}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    trained, folder = _base_and_folder(project / "swag_adapters")
    post = LoraPosterior.from_pretrained(trained, folder)
    heads = {n: p for n, p in trained.member_parameters().items() if n not in names}
    assert heads
    for name, p in post.sample(3).member_parameters().items():
        if name in heads:
            assert torch.equal(p, heads[name].repeat_interleave(3, dim=0)), name
    assert main(["evaluate", "--checkpoint", str(project / "swag_adapters"), "--samples", "2"]) == 0


def test_a_tfb_run_calibrates_on_the_validation_set(project, capsys):
    code, _ = fit(project, "tfb", "training.posterior={method: tfb, max_nll_increase: 0.01}")
    assert code == 0
    meta = json.loads((project / "tfb" / "posterior" / "posterior_config.json").read_text())
    assert meta["method"] == "tfb" and meta["tfb"]["max_nll_increase"] == 0.01
    assert all(v <= 0.01 for v in meta["tfb"]["increase"]) and meta["tfb"]["num_anchor"] == 4
    assert main(["evaluate", "--checkpoint", str(project / "tfb"), "--samples", "2"]) == 0
    assert json.loads((project / "tfb" / "evaluation_samples_2.json").read_text())["members"] == 4


@pytest.mark.parametrize("override, message", [
    ("training.posterior={method: laplace}", "training.posterior.method: expected 'swag' or 'tfb', got 'laplace'"),
    ("training.posterior={method: swag, rank: 0}", "training.posterior.rank must be an integer >= 1, got 0"),
    ("training.posterior={every: 3}", "training.posterior: unknown key(s) ['every']"),
    ("training.posterior={method: tfb, include_heads: true}",
     "training.posterior.include_heads is SWAG's: method 'tfb' perturbs the A matrices alone"),
    ("training.posterior={include_heads: 1}", "training.posterior.include_heads must be true, false or null, got 1"),
])
def test_a_wrong_posterior_setting_is_one_error_line(project, capsys, override, message):
    code, _ = fit(project, "wrong", override)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (project / "wrong").exists()


def test_a_posterior_needs_a_lora_ensemble_and_samples_need_a_posterior(project, capsys, tmp_path):
    code, _ = fit(project, "wrong", "method.name=single", "training.posterior={method: swag}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method 'single' has none" in err[0], err
    code, _ = fit(project, "plain")
    assert code == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(project / "plain"), "--samples", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples needs the posterior" in err[0], err


def test_the_settings_are_filled_in_and_survive_the_saved_config(project, tmp_path):
    config = load_run_config(project / "run.yaml", ["training.posterior={method: tfb}"])
    assert config.training.posterior == {"method": "tfb", "rank": 5, "start_epoch": 0, "collect_every_n_steps": 0,
                                         "max_nll_increase": 0.003, "swa_lr": None, "include_heads": None}


@pytest.mark.parametrize("settings", ["{method: swag, rank: 2}", "{method: swag, rank: 2, include_heads: false}"])
def test_a_resumed_run_continues_the_same_collection(project, tmp_path, settings):
    from safetensors.torch import load_file

    from lora_ensemble.app.runner import fit as run_fit

    config = load_run_config(project / "run.yaml", ["training.epochs=3", f"training.posterior={settings}",
                                                    "training.progress_bar=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        run_fit(config, str(tmp_path / "whole"))
        run_fit(config, str(tmp_path / "stopped"), max_epochs=1)  # stops after epoch 1 of 3 (a checkpoint)
        run_fit(config, str(tmp_path / "stopped"), resume=True)
    whole, resumed = (load_file(str(tmp_path / d / "posterior" / "posterior.safetensors")) for d in ("whole", "stopped"))
    meta = json.loads((tmp_path / "stopped" / "posterior" / "posterior_config.json").read_text())
    assert meta["swag"]["num_collected"] == 3 and whole.keys() == resumed.keys()
    for name in whole:
        assert (whole[name] - resumed[name]).abs().max() < 1e-6, name


@pytest.fixture
def lrs(monkeypatch) -> list[float]:
    """The learning rate of every training batch, as the optimizer holds it when the batch starts."""
    from lora_ensemble.lightning.posterior import PosteriorCallback

    seen: list[float] = []
    real = PosteriorCallback.on_train_batch_start

    def record(self, trainer, module, *args):
        seen.append(trainer.optimizers[0].param_groups[0]["lr"])
        return real(self, trainer, module, *args)

    monkeypatch.setattr(PosteriorCallback, "on_train_batch_start", record)
    return seen


def test_swa_lr_holds_the_learning_rate_constant_from_the_collection_start(project, lrs):
    """SWAG's collection phase at a constant rate: the epochs before start_epoch follow the run's warm-up + cosine
    schedule, every optimizer step from start_epoch on runs at swa_lr exactly (3 steps an epoch here)."""
    code, _ = fit(project, "swa", "training.epochs=3",
                  "training.posterior={method: swag, rank: 2, start_epoch: 1, collect_every_n_steps: 1, swa_lr: 3e-4}")
    assert code == 0 and len(lrs) == 9
    assert all(lr != 3e-4 for lr in lrs[:3]) and lrs[3:] == [3e-4] * 6
    meta = json.loads((project / "swa" / "posterior" / "posterior_config.json").read_text())
    assert meta["swag"]["num_collected"] == 6
    lrs.clear()  # the same run without swa_lr: the schedule decays through the collection
    assert fit(project, "no_swa", "training.epochs=3",
               "training.posterior={method: swag, rank: 2, start_epoch: 1, collect_every_n_steps: 1}")[0] == 0
    assert len(set(lrs[3:])) == 6


@pytest.mark.parametrize("stop_after", [1, 2])  # stopped before the collection phase, and inside it
def test_a_resumed_swa_lr_run_steps_at_the_same_rates_and_collects_the_same_moments(project, tmp_path, lrs,
                                                                                     stop_after):
    from safetensors.torch import load_file

    from lora_ensemble.app.runner import fit as run_fit

    config = load_run_config(project / "run.yaml", [
        "training.epochs=3", "training.progress_bar=false",
        "training.posterior={method: swag, rank: 2, start_epoch: 1, collect_every_n_steps: 1, swa_lr: 3e-4}"])
    with contextlib.redirect_stdout(io.StringIO()):
        run_fit(config, str(tmp_path / "whole"))
        whole_lrs = lrs[:]
        lrs.clear()
        run_fit(config, str(tmp_path / "stopped"), max_epochs=stop_after)
        run_fit(config, str(tmp_path / "stopped"), resume=True)
    assert len(whole_lrs) == 9 and whole_lrs[3:] == [3e-4] * 6
    assert lrs == pytest.approx(whole_lrs, rel=1e-9, abs=0)
    whole, resumed = (load_file(str(tmp_path / d / "posterior" / "posterior.safetensors")) for d in ("whole", "stopped"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert (whole[name] - resumed[name]).abs().max() < 1e-6, name


@pytest.mark.parametrize("settings, message", [
    ("{method: tfb, swa_lr: 1e-3}", "training.posterior.swa_lr is the constant learning rate of SWAG's collection"),
    ("{method: swag, swa_lr: 0}", "training.posterior.swa_lr must be a number > 0 (or null), got 0"),
])
def test_a_bad_swa_lr_is_one_error_line(project, capsys, settings, message):
    code, _ = fit(project, "bad_swa", f"training.posterior={settings}")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_finished_run_gets_a_tfb_posterior_without_training(project, capsys):
    """`lora-ensemble posterior` on a run fitted without training.posterior: sigma found on its validation split
    (the anchor NLL increase under the threshold), written to <run>/posterior; then evaluate --samples works."""
    assert fit(project, "later_tfb")[0] == 0
    run = project / "later_tfb"
    weights = (run / "model" / "weights.safetensors").read_bytes()
    assert main(["posterior", "--checkpoint", str(run), "--max-nll-increase", "0.01"]) == 0
    assert "TFB sigma per member" in capsys.readouterr().out
    meta = json.loads((run / "posterior" / "posterior_config.json").read_text())
    assert meta["method"] == "tfb" and meta["tfb"]["num_anchor"] == 4      # the 4 validation rows, not the test's
    assert all(v <= 0.01 for v in meta["tfb"]["increase"])
    assert (run / "model" / "weights.safetensors").read_bytes() == weights  # the trained members are untouched
    assert main(["evaluate", "--checkpoint", str(run), "--samples", "2"]) == 0
    assert json.loads((run / "evaluation_samples_2.json").read_text())["members"] == 4
    # a second call does not replace it silently; a run without LoRA members has no posterior
    assert main(["posterior", "--checkpoint", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "already holds a posterior; pass --overwrite" in err[0], err
    assert main(["posterior", "--checkpoint", str(run), "--overwrite"]) == 0
    assert fit(project, "later_single", "method={name: single}")[0] == 0
    capsys.readouterr()
    assert main(["posterior", "--checkpoint", str(project / "later_single")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "a posterior is over the members of a LoRA-Ensemble" in err[0], err
    assert not (project / "later_single" / "posterior").exists()
