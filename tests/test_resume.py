"""A `fit` that is killed or pre-empted continues with `--resume` as if it had never stopped; a finished or
damaged run folder is reported in one line.

The runs are `python -m lora_ensemble.app.cli fit` subprocesses on a tiny model with dropout on (BERT's hidden and
attention dropout 0.1, LoRA dropout 0.1): 7 batches per epoch, 3 epochs, a checkpoint every 2 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_ensemble.app.cli import main
from lora_ensemble.app.run_config import ConfigError, parse_run_config

BATCHES_PER_EPOCH = 7
RUN = {
    "seed": 0,
    "model": {"name": "tiny:text", "max_length": 16},
    "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "init_gain": 1.0, "lora_dropout": 0.1},
    "data": {"name": "bbc_news", "batch_size": 4, "train_size": 4 * BATCHES_PER_EPOCH, "val_size": 4,
             "test_size": 4},
    "training": {"epochs": 3, "lr": 1e-2, "warmup_steps": 1, "progress_bar": False, "accelerator": "cpu",
                 "checkpoint_every_n_steps": 2},
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TIMEOUT = 300


def start_fit(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_ensemble.app.cli", "fit", "--config", str(config),
                             "--output-dir", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen) -> Path:
    """Poll until the run has written its first checkpoint (the process is then in the middle of training)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"fit ended (status {proc.returncode}) before writing {path}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint after {TIMEOUT} s")
        time.sleep(0.005)
    return path


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def assert_same_run(resumed: Path, reference: Path) -> None:
    a = load_file(reference / "model" / "weights.safetensors")
    b = load_file(resumed / "model" / "weights.safetensors")
    assert set(a) == set(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    ref = json.loads((reference / "results.json").read_text())
    res = json.loads((resumed / "results.json").read_text())
    assert res["metrics"] == ref["metrics"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "tiny.yaml"
    path.write_text(yaml.safe_dump(RUN))
    return path


@pytest.fixture(scope="module")
def reference_in_background(config):
    """Starts the uninterrupted run now; `.result()` waits for it, so it runs alongside a killed run."""
    run_dir = config.parent / "uninterrupted"
    proc = start_fit(config, run_dir)

    class Pending:
        def result(self) -> Path:
            if proc.returncode is None:
                status, err = finish(proc)
                assert status == 0, err[-3000:]
            return run_dir

    yield Pending()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_fit_killed_mid_epoch_resumes_to_the_same_weights_and_metrics_bit_for_bit(config, reference_in_background):
    run_dir = config.parent / "killed"
    proc = start_fit(config, run_dir)
    checkpoint = wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, like a node that dies or `kill -9`
    proc.wait(timeout=TIMEOUT)
    step = global_step(checkpoint)
    assert step % BATCHES_PER_EPOCH != 0, f"the checkpoint should be from the middle of an epoch, got step {step}"
    assert not (run_dir / "results.json").exists()

    status, err = finish(start_fit(config, run_dir, "--resume"))
    assert status == 0, err[-3000:]
    assert_same_run(run_dir, reference_in_background.result())

    # the training time covers both segments, one time per epoch (the interrupted epoch counts once)
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["train_segments_s"]) == 2
    assert results["train_time_s"] == pytest.approx(sum(results["train_segments_s"]))
    assert len(results["train_epoch_times_s"]) == RUN["training"]["epochs"]
    assert all(t > 0 for t in results["train_epoch_times_s"])


def test_sigterm_writes_a_checkpoint_exits_with_one_line_and_the_run_resumes_exactly(config, reference_in_background):
    run_dir = config.parent / "preempted"
    proc = start_fit(config, run_dir)
    checkpoint = wait_for_checkpoint(run_dir, proc)
    seen = global_step(checkpoint)
    proc.send_signal(signal.SIGTERM)  # SLURM's pre-emption signal
    status, err = finish(proc)
    assert status != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("stopped by SIGTERM: checkpoint ") and str(checkpoint) in lines[-1], err[-3000:]
    assert "--resume" in lines[-1] and "Traceback" not in err
    # written on the way out, after the optimizer step that was running (not only the periodic one seen above)
    assert global_step(checkpoint) > seen
    assert not list(checkpoint.parent.glob(".tmp-*"))

    status, err = finish(start_fit(config, run_dir, "--resume"))
    assert status == 0, err[-3000:]
    assert_same_run(run_dir, reference_in_background.result())


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resume_of_a_finished_run_says_so_and_leaves_its_results_alone(config, reference_in_background, tmp_path,
                                                                      capsys):
    run_dir = copy_run(reference_in_background.result(), tmp_path / "finished")
    before = (run_dir / "results.json").read_bytes()
    assert main(["fit", "--config", str(config), "--output-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume:") and "finished" in err[0]
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_resume_from_a_damaged_checkpoint_is_one_error_line(config, reference_in_background, tmp_path, capsys, damage):
    run_dir = copy_run(reference_in_background.result(), tmp_path / "damaged")
    (run_dir / "results.json").unlink()  # a run killed before it finished
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint\n" * 100)
    assert main(["fit", "--config", str(config), "--output-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: ") and str(last) in err[0], err
    assert "not a readable checkpoint" in err[0]


@pytest.mark.parametrize("value", [-1, 1.5, True, "often"])
def test_checkpoint_every_n_steps_must_be_a_whole_number_of_steps(value):
    raw = json.loads(json.dumps(RUN))
    raw["training"]["checkpoint_every_n_steps"] = value
    with pytest.raises(ConfigError, match="training.checkpoint_every_n_steps"):
        parse_run_config(raw)
