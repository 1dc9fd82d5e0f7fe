"""What a user relies on from a run folder and from `fit`'s output: a repeated fit needs --overwrite, a run predicts
after its data moved, unseen test labels can be OOD data, progress shows in a log file, the output is ours."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_project import folder_hashes, make_project, reviews

from lora_ensemble.app.cli import main

EXE = str(Path(sys.executable).with_name("lora-ensemble"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    make_project(root)
    return root


@pytest.fixture(scope="module")
def trained(project):
    """A finished run (2 epochs) and what `fit` printed on stdout (a file, as in a cluster job)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fit", "--config", str(project / "run.yaml"), "--output-dir", str(project / "run"),
                     "--set", "training.epochs=2"])
    assert code == 0
    return project / "run", out.getvalue()


def test_fit_prints_one_line_per_epoch_when_stdout_is_not_a_terminal(trained):
    _, out = trained
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    for line in lines:
        assert "train/loss " in line and "val/acc " in line and "val/nll " in line and line.endswith(" s")


def test_the_metrics_log_has_each_metric_once(trained):
    run, _ = trained
    header = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/acc" in header and "val/acc_" not in header and "test/acc_" not in header


def test_a_run_folder_predicts_after_its_data_moved(trained, tmp_path, capsys):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = run.parent / "data"
    moved = tmp_path / "data_moved"
    shutil.move(data, moved)
    try:
        inputs = tmp_path / "inputs.txt"
        inputs.write_text("a great and lovely film\nawful, dull and sad\n")
        assert main(["predict", "--checkpoint", str(copy), "--input", str(inputs)]) == 0
    finally:
        shutil.move(moved, data)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(row["prediction"] in ("neg", "pos") for row in rows)
    assert json.loads((copy / "run_info.json").read_text())["class_names"] == ["neg", "pos"]


def test_fit_into_a_finished_run_replaces_it_only_with_overwrite(project, tmp_path, capsys):
    config = ["fit", "--config", str(project / "run.yaml"), "--output-dir", str(tmp_path / "run")]
    assert main(config) == 0
    (tmp_path / "run" / "evaluation.json").write_text("{}")  # from an earlier `evaluate`
    before = folder_hashes(tmp_path / "run")
    assert main(config) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert folder_hashes(tmp_path / "run") == before
    assert main(config + ["--overwrite", "--set", "seed=1"]) == 0
    after = folder_hashes(tmp_path / "run")
    assert "evaluation.json" not in after                  # nothing of the old run is left to mix with the new
    assert after["model/weights.safetensors"] != before["model/weights.safetensors"]
    assert yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())["seed"] == 1


def test_test_rows_of_an_unseen_label_can_be_evaluated_as_ood_data(project, tmp_path):
    (tmp_path / "test.csv").write_text(reviews(9, 3, ("pos", "neg", "meh")))
    assert main(["fit", "--config", str(project / "run.yaml"), "--output-dir", str(tmp_path / "run"), "--set",
                 f"data.path_or_paths.test={tmp_path / 'test.csv'}", "data.unseen_test_labels=ood"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "ood/auroc_mi" in results["metrics"]             # the 3 'meh' rows are the OOD set
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["class_names"] == ["neg", "pos"]


def test_output_is_ours_by_default_and_verbose_adds_lightning_and_transformers(trained):
    run, _ = trained
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    quiet = subprocess.run([EXE, "evaluate", "--checkpoint", str(run)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    verbose = subprocess.run([EXE, "evaluate", "--checkpoint", str(run), "--verbose"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert verbose.returncode == 0
    assert "GPU available" in verbose.stderr                # Lightning
    assert "LOAD REPORT" in verbose.stderr and "MISSING" in verbose.stderr  # transformers: the new classifier


def test_the_progress_bar_counts_epochs_from_one_of_all():
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lora_ensemble.lightning.callbacks import EpochProgressBar

    bar = EpochProgressBar()
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel())
    assert bar.train_progress_bar.desc.startswith("Epoch 3/3")


def test_ddp_processes_after_the_first_accept_the_folder_the_first_one_wrote(tmp_path, monkeypatch):
    """Lightning's DDP children re-run `lora-ensemble fit`: only the launching process may refuse the folder."""
    from lora_ensemble.app.cli import check_run_dir

    (tmp_path / "run_config.yaml").write_text("seed: 0\n")  # what rank 0 wrote before starting the children
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="already holds files"):
        check_run_dir(str(tmp_path), resume=False, overwrite=False)
    monkeypatch.setenv("SLURM_PROCID", "0")  # one SLURM task launching Lightning's children ...
    monkeypatch.setenv("LOCAL_RANK", "1")   # ... and the second of them
    check_run_dir(str(tmp_path), resume=False, overwrite=False)
