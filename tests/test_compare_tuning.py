"""`compare`'s tuning stage: Optuna picks the trial with the lowest validation NLL, trials never touch the test
split, a killed compare resumes its study, and a bad search space is one error line before anything trains."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml
from compare_configs import tiny_compare_config

from lora_ensemble.app import compare, runner
from lora_ensemble.app.cli import main
from lora_ensemble.app.compare import run_compare

TINY = tiny_compare_config(
    {"max_epochs": 2, "early_stopping_patience": 1, "lr": 1e-3},
    tuning={"trials": 5, "seed": 0, "space": {"lora_ensemble": {"lr": [1e-4, 1e-1], "init_gain": [0.5, 20.0]}},
            "start": {"lora_ensemble": [{"lr": 1e-3, "init_gain": 1.0}]}})


def write_config(tmp_path, **changes):
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section][leaf] = value
        else:
            raw[section] = value
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def fake_score(params):
    """A known optimum: lr 10^-2.5, init_gain 3."""
    return (math.log10(params["training"]["lr"]) + 2.5) ** 2 + (math.log(params["method"]["init_gain"] / 3.0)) ** 2


def test_tuning_keeps_the_trial_with_the_lowest_validation_nll_and_never_builds_a_test_loader(tmp_path, monkeypatch):
    real_train_one, real_loader = compare.train_one, runner.Run.loader
    trial_loaders, final_loaders, scores = [], [], {}
    stage = {"trial": False}

    def train_one(config, run_dir, evaluate_test=True):
        stage["trial"] = not evaluate_test
        status = real_train_one(config, run_dir, evaluate_test)  # a real run through runner.fit
        if not evaluate_test and status["status"] == "ok":       # ... scored by the fake objective
            status["results"]["best_val_nll"] = scores[run_dir] = fake_score(config.to_dict())
        return status

    def loader(self, split, *args, **kwargs):
        (trial_loaders if stage["trial"] else final_loaders).append(split)
        return real_loader(self, split, *args, **kwargs)

    monkeypatch.setattr(compare, "train_one", train_one)
    monkeypatch.setattr(runner.Run, "loader", loader)
    summary = run_compare(write_config(tmp_path), ["lora_ensemble"], seeds=1, output_dir=str(tmp_path / "out"),
                          isolate=False)
    tuned = summary["tuning"]["lora_ensemble"]
    finished = [t for t in tuned["trials"] if t["state"] == "COMPLETE"]
    assert len(finished) == 5 and len(scores) == 5
    assert tuned["trials"][0]["params"] == {"lr": 1e-3, "init_gain": 1.0}  # the start setting runs first
    best = min(finished, key=lambda t: t["value"])
    assert tuned["best"] == best["params"] and tuned["best_value"] == pytest.approx(min(scores.values()))
    final = summary["runs"]["lora_ensemble"][0]["config"]
    assert final["training"]["lr"] == best["params"]["lr"] and final["method"]["init_gain"] == best["params"]["init_gain"]
    assert set(trial_loaders) == {"train", "val"}               # trials: no test or OOD loader at all
    assert {"test", "ood"} <= set(final_loaders)                 # the final run is tested once
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| lora_ensemble | 5/5 |" in table and (tmp_path / "out" / "tuning.db").is_file()


def _complete_trials(db):
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT number FROM trials WHERE state = 'COMPLETE' ORDER BY number").fetchall()
    except sqlite3.OperationalError:  # the file exists but Optuna has not yet created its tables
        return []


def test_a_killed_compare_resumes_its_study_without_running_finished_trials_again(tmp_path):
    config = write_config(tmp_path, tuning={"trials": 3, "seed": 0})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lora_ensemble.app.cli", "compare", "--config", config, "--methods",
               "single_lora", "--seeds", "1", "--output-dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    db = out / "tuning.db"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and first.poll() is None:
            if db.is_file() and len(_complete_trials(db)) >= 1:
                break
            time.sleep(0.5)
        assert first.poll() is None, first.stdout.read().decode()  # still tuning when killed
        os.killpg(first.pid, signal.SIGKILL)                          # the compare and its trial process
    finally:
        first.wait(timeout=30)
    done = [n for (n,) in _complete_trials(db)]
    assert 1 <= len(done) < 3
    stamps = {n: os.stat(out / "tuning" / "single_lora" / f"trial{n}" / "results.json").st_mtime_ns for n in done}

    second = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"tune single_lora: {len(done)}/3 trials already finished" in second.stdout
    ran_again = [line for line in second.stdout.splitlines() if line.startswith("tune single_lora trial ")]
    assert not any(line.startswith(f"tune single_lora trial {n}:") for n in done for line in ran_again)
    assert len(_complete_trials(db)) == 3
    for n, stamp in stamps.items():  # the finished trials' folders were not written again
        assert os.stat(out / "tuning" / "single_lora" / f"trial{n}" / "results.json").st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["runs"]["single_lora"][0]["status"] == "ok"


@pytest.mark.parametrize("space, message", [
    ({"lora_ensemble": {"init_std": [0.01, 0.1]}},
     "tuning.space.lora_ensemble.init_std: unknown parameter for lora_ensemble; it tunes ['init_gain', 'lr']"),
    ({"lora_ensemble": {"lr": [1e-2, 1e-3]}}, "tuning.space.lora_ensemble.lr: empty range [0.01, 0.001]"),
    ({"lora_ensemble": {"lr": [1e-3, 1e-3]}}, "tuning.space.lora_ensemble.lr: empty range [0.001, 0.001]"),
    ({"lora_ensemble": {"lr": [0, 1e-3]}}, "tuning.space.lora_ensemble.lr: a log-scale range needs low > 0"),
    ({"lora_ensemble": {"lr": "fast"}}, "tuning.space.lora_ensemble.lr: expected [low, high] or {low, high, log}"),
    ({"lora_ensembel": {"lr": [1e-4, 1e-3]}}, "tuning.space.lora_ensembel: unknown method"),
])
def test_a_bad_search_space_is_one_error_line_before_anything_trains(tmp_path, capsys, space, message):
    config = write_config(tmp_path, tuning={"trials": 2, "space": space})
    out = tmp_path / "out"
    code = main(["compare", "--config", config, "--methods", "lora_ensemble", "--seeds", "1", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: " + message), err
    assert not out.exists()  # nothing built, nothing trained


def test_a_start_setting_outside_its_range_or_missing_a_parameter_is_refused(tmp_path):
    for start, message in (([{"lr": 1.0, "init_gain": 1.0}], r"lr: 1 lies outside the search range"),
                           ([{"lr": 1e-3}], r"missing \['init_gain'\]")):
        config = write_config(tmp_path, tuning={"trials": 2, "start": {"lora_ensemble": start}})
        with pytest.raises(compare.ConfigError, match=message):
            run_compare(config, ["lora_ensemble"], seeds=1, output_dir=str(tmp_path / "out"), isolate=False)


def test_jobs_need_isolated_runs_and_a_bad_storage_url_is_one_error_line(tmp_path, capsys):
    config = write_config(tmp_path, tuning={"trials": 2})
    with pytest.raises(compare.ConfigError, match="--jobs > 1 runs trials in worker processes"):
        run_compare(config, ["lora_ensemble"], seeds=1, output_dir=str(tmp_path / "out"), isolate=False, jobs=2)
    code = main(["compare", "--config", config, "--methods", "lora_ensemble", "--seeds", "1", "--output-dir",
                 str(tmp_path / "out2"), "--storage", "nosuchdb://nowhere/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --storage 'nosuchdb://nowhere/x': cannot open"), err
    assert not (tmp_path / "out2" / "tuning").exists()  # no trial ran


def test_methods_with_the_same_search_space_do_not_draw_the_same_values(tmp_path):
    from lora_ensemble.app.tuning import parse_tuning, tune_method

    tuning = parse_tuning({"trials": 2}, ["single", "explicit"])
    drawn = {}
    for method in ("single", "explicit"):
        result = tune_method(method, tuning, f"sqlite:///{tmp_path}/t.db", f"out/{method}", {}, True,
                             lambda params, n: {"status": "ok", "results": {"best_val_nll": params["lr"]}}, log=lambda s: None)
        drawn[method] = [t["params"]["lr"] for t in result["trials"]]
    assert drawn["single"] != drawn["explicit"]


def test_a_study_saved_before_an_option_existed_resumes_without_training_again(tmp_path, monkeypatch):
    """A library upgrade that adds a run-config option (at its default) must not invalidate a running study: the
    saved study fingerprint and the run folders' run_config.yaml lack the option, and the rerun keeps them."""
    import optuna

    config, out = write_config(tmp_path, tuning={"trials": 2, "seed": 0}), tmp_path / "out"
    run_compare(config, ["single_lora"], seeds=1, output_dir=str(out))  # isolated runs: they write their status
    # what the previous version wrote: no training.posterior option anywhere
    study_name = f"{out.name}/single_lora"
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'tuning.db'}")
    fingerprint = study.user_attrs["fingerprint"]
    del fingerprint["run config"]["training"]["posterior"]
    study.set_user_attr("fingerprint", fingerprint)
    saved_config = out / "single_lora" / "seed0" / runner.CONFIG_FILE
    saved = yaml.safe_load(saved_config.read_text())
    del saved["training"]["posterior"]
    saved_config.write_text(yaml.safe_dump(saved, sort_keys=False))

    monkeypatch.setattr(compare, "run_isolated", lambda *a, **k: pytest.fail("trained again"))
    summary = run_compare(config, ["single_lora"], seeds=1, output_dir=str(out))
    assert summary["runs"]["single_lora"][0]["status"] == "ok"
