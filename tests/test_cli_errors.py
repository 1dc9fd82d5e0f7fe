"""Every user mistake we know of, through the command line: exit status 2, exactly one `error:` line naming the
problem, no traceback, and the finished run folder byte for byte as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_project import MAX_POSITIONS, folder_hashes, make_project, reviews

import lora_ensemble.app.runner
from lora_ensemble.app.cli import main


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    config = make_project(root)
    assert main(["fit", "--config", str(config), "--output-dir", str(root / "run")]) == 0
    damaged = root / "damaged"
    shutil.copytree(root / "run", damaged)
    weights = damaged / "model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])                           # a copy cut short
    (root / "data" / "test_new_label.csv").write_text(reviews(4, 2, ("pos", "neg", "meh")))
    (root / "data" / "latin1.csv").write_bytes("text,label\ncafé crème,pos\nbad,neg\n".encode("latin-1"))
    (root / "latin1.txt").write_bytes("un café\n".encode("latin-1"))
    (root / "latin1.yaml").write_bytes("seed: 0\nmodel: {name: café}\n".encode("latin-1"))
    (root / "syntax.yaml").write_text("seed: 0\nmodel:\n  name: minilm\n  max_length: [64\ntraining: {epochs: 1}\n")
    (root / "inputs.txt").write_text("a good film\n")
    (root / "a_file.png").write_bytes(b"not a folder")
    (root / "outputs").mkdir()
    (root / "empty_run").mkdir()
    return root


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


FIT = ["fit", "--config", "{root}/run.yaml"]
NEW_DIR = ["--output-dir", "{root}/new_run"]

# (case, command line, what the error line says, must fail before the data and the model load)
CASES = [
    ("fit-bad-option-into-finished-run", FIT + ["--output-dir", "{root}/run", "--set", "method.r=0"],
     "already holds a finished run", True),
    ("fit-overwrite-with-bad-option", FIT + ["--output-dir", "{root}/run", "--overwrite", "--set", "method.r=0"],
     "r must be an integer >= 1, got 0", True),
    ("fit-into-finished-run", FIT + ["--output-dir", "{root}/run"], "pass --overwrite to replace it", True),
    ("fit-resume-and-overwrite", FIT + ["--output-dir", "{root}/run", "--resume", "--overwrite"],
     "give one of them", True),
    ("negative-num-members", FIT + NEW_DIR + ["--set", "method.num_members=-1"],
     "num_members must be an integer >= 1, got -1", True),
    ("unknown-method-option", FIT + NEW_DIR + ["--set", "method.rr=2"], "unknown option(s) ['rr']", True),
    ("unknown-training-key", FIT + NEW_DIR + ["--set", "training.learning_rate=0.1"],
     "training: unknown key 'learning_rate'; known keys:", True),
    ("wrong-type", FIT + NEW_DIR + ["--set", "training.epochs=three"], "training.epochs: expected int, got 'three'",
     True),
    ("unknown-data-argument", FIT + NEW_DIR + ["--set", "data.train_sise=8"], "unknown argument", False),
    ("unknown-method", FIT + NEW_DIR + ["--set", "method.name=lora_ensembel"],
     "unknown method 'lora_ensembel'; known methods", True),
    ("unknown-top-level-key", FIT + NEW_DIR + ["--set", "extra=1"], "unknown top-level key", True),
    ("override-without-equals", FIT + NEW_DIR + ["--set", "training.epochs"], "must look like section.key=value",
     True),
    ("override-bad-yaml", FIT + NEW_DIR + ["--set", "method.layers=[1"], "not valid YAML (line 1, column 3", True),
    ("negative-num-workers", FIT + NEW_DIR + ["--set", "data.num_workers=-1"], "data.num_workers must be >= 0", True),
    ("negative-weight-decay", FIT + NEW_DIR + ["--set", "training.weight_decay=-1"],
     "training.weight_decay must be >= 0", True),
    ("no-gradient-accumulation-steps", FIT + NEW_DIR + ["--set", "training.accumulate_grad_batches=0"],
     "training.accumulate_grad_batches must be >= 1", True),
    ("validate-every-0-epochs", FIT + NEW_DIR + ["--set", "training.val_every_n_epochs=0"],
     "training.val_every_n_epochs must be >= 1", True),
    ("unknown-model-kwarg", FIT + NEW_DIR + ["--set", "model.kwargs.foo=1"], "unexpected keyword argument 'foo'",
     False),
    ("yaml-syntax-error", ["fit", "--config", "{root}/syntax.yaml"] + NEW_DIR, "syntax.yaml is not valid YAML: line 5, "
     "column 9", True),
    ("yaml-not-utf8", ["fit", "--config", "{root}/latin1.yaml"] + NEW_DIR, "latin1.yaml is not UTF-8", True),
    ("missing-config", ["fit", "--config", "{root}/nope.yaml"] + NEW_DIR, "config file", True),
    ("csv-not-utf8", FIT + NEW_DIR + ["--set", "data.path_or_paths.train={root}/data/latin1.csv"],
     "latin1.csv is not UTF-8 text (byte 0xe9", False),
    ("label-only-in-test-file", FIT + NEW_DIR + ["--set", "data.path_or_paths.test={root}/data/test_new_label.csv"],
     "label(s) ['meh'] of {root}/data/test_new_label.csv", False),
    ("unknown-unseen-label-mode", FIT + NEW_DIR + ["--set", "data.unseen_test_labels=maybe"],
     "unseen_test_labels='maybe' is not accepted", False),
    ("missing-model-folder", FIT + NEW_DIR + ["--set", "model.name=/no/such/dir"],
     "model.name '/no/such/dir': no such folder", False),
    ("max-length-over-positions", FIT + NEW_DIR + ["--set", "model.max_length=100000"],
     f"model.max_length=100000 is more than the {MAX_POSITIONS} positions", False),
    ("bad-precision", FIT + NEW_DIR + ["--set", "training.precision=foo"], "training: Precision 'foo' is invalid",
     False),
    ("evaluate-not-a-run", ["evaluate", "--checkpoint", "{root}/empty_run"], "run_config.yaml not found", True),
    ("evaluate-plots-is-a-file", ["evaluate", "--checkpoint", "{root}/run", "--plots", "{root}/a_file.png"],
     "--plots '{root}/a_file.png' is a file", True),
    ("evaluate-output-is-a-folder", ["evaluate", "--checkpoint", "{root}/run", "--output", "{root}/outputs"],
     "is a folder", True),
    ("evaluate-truncated-weights", ["evaluate", "--checkpoint", "{root}/damaged"],
     "weights.safetensors cannot be read", True),
    ("evaluate-new-label", ["evaluate", "--checkpoint", "{root}/run", "--set",
                            "data.path_or_paths.test={root}/data/test_new_label.csv"], "label(s) ['meh']", False),
    ("evaluate-moved-data", ["evaluate", "--checkpoint", "{root}/run", "--set",
                             "data.path_or_paths.train={root}/data/moved.csv"], "missing {root}/data/moved.csv", False),
    ("predict-unknown-extension", ["predict", "--checkpoint", "{root}/run", "--input", "{root}/inputs.txt",
                                   "--output", "{root}/preds.xlsx"], "unknown extension", True),
    ("predict-batch-size-0", ["predict", "--checkpoint", "{root}/run", "--input", "{root}/inputs.txt",
                              "--batch-size", "0"], "--batch-size: must be >= 1, got 0", True),
    ("predict-truncated-weights", ["predict", "--checkpoint", "{root}/damaged", "--input", "{root}/inputs.txt"],
     "weights.safetensors cannot be read", True),
    ("predict-input-not-utf8", ["predict", "--checkpoint", "{root}/run", "--input", "{root}/latin1.txt"],
     "latin1.txt is not UTF-8 text", False),
    ("predict-missing-input", ["predict", "--checkpoint", "{root}/run", "--input", "{root}/nope.txt"], "not found",
     False),
    ("unknown-command", ["fitt"], "invalid choice: 'fitt'", True),
]


@pytest.mark.parametrize("argv, message, before_load", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_and_leaves_every_run_as_it_was(project, capsys, monkeypatch, argv, message,
                                                                    before_load):
    if before_load:  # a config mistake is reported before the (slow) data and model loading
        def must_not_load(*args, **kwargs):
            raise AssertionError("the data or the model was loaded before the mistake was reported")

        monkeypatch.setattr(lora_ensemble.app.runner, "load_dataset", must_not_load)
        monkeypatch.setattr(lora_ensemble.app.runner, "build_model", must_not_load)
    folders = [project / "run", project / "damaged", project / "new_run"]
    before = [folder_hashes(f) for f in folders]
    code, err = run_main([a.format(root=project) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and message.format(root=project) in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert [folder_hashes(f) for f in folders] == before


def test_a_failed_fit_in_a_real_process_leaves_the_finished_run_alone(project):
    """The same promise through the installed command, as a user's shell sees it."""
    before = folder_hashes(project / "run")
    exe = str(Path(sys.executable).with_name("lora-ensemble"))
    proc = subprocess.run([exe, "fit", "--config", str(project / "run.yaml"), "--output-dir", str(project / "run"),
                           "--overwrite", "--set", "method.r=0"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: method: r must be an integer >= 1, got 0"]
    assert folder_hashes(project / "run") == before
