"""`compare`'s posterior rows (issue 15): `<base>+swag` / `<base>+tfb` train like their base with
training.posterior, are tested on K draws per trained member, join an earlier compare's folder without
rerunning its rows, and an unknown row is one error line before anything trains."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from compare_configs import tiny_compare_config
from safetensors.torch import load_file

from lora_ensemble.app import runner
from lora_ensemble.app.compare import OUTPUTS_FILE, run_compare
from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.lightning.callbacks import BestValidation
from lora_ensemble.posterior import LoraPosterior

TINY = tiny_compare_config({"max_epochs": 2, "early_stopping_patience": 1, "lr": 1e-3},
                           compare={"lora_ensemble+swag": {"posterior": {"samples": 3}}})


def main_table(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = [c.strip() for c in lines[start].split("|")[1:-1]]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def write_config(folder, raw=TINY):
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """lora_ensemble (2 seeds) into a folder, then the three posterior rows added to the same folder; the
    run folders that `runner.fit` trained in each stage."""
    folder = tmp_path_factory.mktemp("compare_posterior")
    config, out = write_config(folder), folder / "out"
    trained: list[list[str]] = []
    fit = runner.fit

    def counting_fit(config, run_dir, *args, **kwargs):
        trained[-1].append(os.path.relpath(run_dir, out))
        return fit(config, run_dir, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "fit", counting_fit)
    try:
        trained.append([])
        first = run_compare(config, ["lora_ensemble"], seeds=2, output_dir=str(out), isolate=False)
        trained.append([])
        second = run_compare(config, ["lora_ensemble+swag", "lora_ensemble+tfb", "single_lora+swag"], seeds=2,
                             output_dir=str(out), isolate=False)
    finally:
        mp.undo()
    return first, second, out, trained


def test_a_posterior_row_trains_once_per_seed_and_tests_m_times_k_members(two_stages):
    _, summary, out, trained = two_stages
    rows = ("lora_ensemble+swag", "lora_ensemble+tfb", "single_lora+swag")
    assert sorted(trained[1]) == sorted(f"{r}/seed{i}" for r in rows for i in (0, 1))  # once per (row, seed)
    members = {"lora_ensemble+swag": 2 * 3, "lora_ensemble+tfb": 2 * 4, "single_lora+swag": 1 * 16}  # M * K
    table = main_table((out / "results.md").read_text())
    for row, expected in members.items():
        for i, run in enumerate(summary["runs"][row]):
            assert run["status"] == "ok", run.get("error")
            res = run["results"]
            assert (res["posterior"], res["samples"], res["members"]) == (row.split("+")[1], expected // res[
                "trained_members"], expected)
            assert res["trained_members"] == (1 if row.startswith("single_lora") else 2)
            outputs = load_file(str(out / row / f"seed{i}" / OUTPUTS_FILE))
            assert outputs["member_logits"].shape[:2] == (expected, 8)
            assert outputs["ood_member_logits"].shape[0] == expected
            assert run["config"]["method"]["name"] == row.split("+")[0]
            assert run["config"]["training"]["posterior"]["method"] == row.split("+")[1]
            assert res["trained_members_metrics"]["nll"] != res["metrics"]["nll"]  # the table holds the draws'
        assert table[row]["test members"] == str(expected)
    swag = summary["runs"]["lora_ensemble+swag"][0]["config"]["training"]["posterior"]
    assert (swag["rank"], swag["start_epoch"], swag["collect_every_n_steps"]) == (5, 1, 1)  # min(2 // 2, patience 1)
    assert set(summary["paired"]) == set(rows)  # lora_ensemble - row, on the same test samples


def test_a_row_added_to_an_earlier_folder_runs_only_its_runs_and_the_table_holds_all_rows(two_stages):
    first, _second, out, trained = two_stages
    assert sorted(trained[0]) == ["lora_ensemble/seed0", "lora_ensemble/seed1"]
    assert not any(t.startswith("lora_ensemble/") for t in trained[1])  # the earlier row is not rerun
    table = main_table((out / "results.md").read_text())
    assert set(table) == {"lora_ensemble", "lora_ensemble+swag", "lora_ensemble+tfb", "single_lora+swag"}
    assert table["lora_ensemble"]["test members"] == "2" and table["lora_ensemble"]["seeds"] == "2/2"
    saved = json.loads((out / "results.json").read_text())
    assert saved["earlier_rows"] == ["lora_ensemble"]
    assert saved["runs"]["lora_ensemble"] == first["runs"]["lora_ensemble"]  # kept as it was
    assert list(saved["aggregate"]) == ["lora_ensemble", "lora_ensemble+swag", "lora_ensemble+tfb", "single_lora+swag"]
    assert "lora_ensemble+swag" in (out / "results.csv").read_text().splitlines()[2]


@pytest.mark.parametrize("row, why", [
    ("lora_ensemble+laplace", "unknown posterior 'laplace'; posteriors: ['swag', 'tfb']"),
    ("batch_ensemble+swag", ("'batch_ensemble' is not a LoRA method: posterior rows are over ['lora_ensemble', "
                            "'single_lora']")),
])
def test_an_unknown_posterior_row_is_one_error_line_listing_the_rows(tmp_path, row, why):
    config = write_config(tmp_path)
    with pytest.raises(ConfigError) as e:
        run_compare(config, ["lora_ensemble", row], output_dir=str(tmp_path / "out"), isolate=False)
    message = str(e.value)
    assert "\n" not in message and why in message
    assert "posterior rows: ['lora_ensemble+swag', 'lora_ensemble+tfb', 'single_lora+swag', 'single_lora+tfb']" \
        in message
    assert not (tmp_path / "out").exists()  # before anything trains
    with pytest.raises(ConfigError, match=r"compare\.batch_ensemble\+swag: unknown method"):  # in the config too
        run_compare(write_config(tmp_path, {**TINY, "compare": {"batch_ensemble+swag": {}}}), ["lora_ensemble"],
                    output_dir=str(tmp_path / "out"), isolate=False)


def test_tfb_sigma_is_calibrated_on_the_validation_split_at_the_best_epoch(tmp_path, monkeypatch):
    """The anchor batches are the validation split's samples (never the test split's), and the weights
    around which sigma is calibrated are the restored best validation epoch's, not the last epoch's."""
    raw = {**TINY, "training": {**TINY["training"], "early_stopping_patience": 5}}  # both epochs run
    seen: dict[str, object] = {}
    best_weights: dict[str, torch.Tensor] = {}
    on_validation_end = BestValidation.on_validation_end

    def first_epoch_is_best(self, trainer, module):  # the best epoch is epoch 1 whatever val/nll does
        if trainer.current_epoch == 0:
            on_validation_end(self, trainer, module)
            if not trainer.sanity_checking and trainer.state.fn == "fit":
                best_weights.update({k: v.detach().clone() for k, v in module.method.member_parameters().items()})
        elif not trainer.sanity_checking and trainer.state.fn == "fit":
            self.history.append(float(trainer.callback_metrics["val/nll"]))

    calibrate = LoraPosterior.calibrate

    def spying_calibrate(self, batches, *args, **kwargs):
        batches = list(batches)
        seen["labels"] = torch.cat([b["labels"] for b in batches])
        seen["weights"] = {k: v.detach().clone() for k, v in self.ensemble.member_parameters().items()}
        return calibrate(self, batches, *args, **kwargs)

    monkeypatch.setattr(BestValidation, "on_validation_end", first_epoch_is_best)
    monkeypatch.setattr(LoraPosterior, "calibrate", spying_calibrate)
    out = tmp_path / "out"
    summary = run_compare(write_config(tmp_path, raw), ["lora_ensemble+tfb"], seeds=1, output_dir=str(out),
                          isolate=False)
    run = summary["runs"]["lora_ensemble+tfb"][0]
    assert run["status"] == "ok", run.get("error")
    assert run["results"]["epochs_run"] == 2 and run["results"]["best_epoch"] == 1
    built = runner.build_run(runner.load_run_config(str(out / "lora_ensemble+tfb" / "seed0" / runner.CONFIG_FILE)))
    val_labels = torch.tensor([built.splits.val[i][1] for i in range(len(built.splits.val))])
    assert len(seen["labels"]) == len(built.splits.val) == 4 != len(built.splits.test)
    assert torch.equal(seen["labels"].cpu(), val_labels.to(seen["labels"].dtype))
    assert best_weights and set(seen["weights"]) == set(best_weights)
    for name, value in best_weights.items():  # the best (first) epoch's weights, not the second's
        assert torch.equal(seen["weights"][name], value), name
