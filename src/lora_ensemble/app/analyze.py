"""`lora-ensemble analyze --checkpoint RUN`: do the members of a finished run reach different modes?

Loads the run folder as `evaluate` does (`runner.load_run`), runs the chosen split once and writes every number
of `lora_ensemble.analysis` to one JSON file (atomically; default <run>/analysis.json):

    function_space    disagreement / KL / JS / error-correlation matrices, the diversity-accuracy plane,
                      per-class disagreement, each member's accuracy and NLL        (every method)
    weight_space      cosine of the members' updates dW_m = s B_m A_m, per projection and over the model,
                      effective rank                                                 (LoRA-Ensemble runs)
    connectivity      loss / accuracy along the straight path of every member pair (or a sample of pairs), the
                      barriers, and with --control the same curve between two snapshots of one member
    representations   linear CKA between the members' pooled features at every adapted block

A run of a method without LoRA adapters (explicit, MC dropout, snapshot, ...) gets the function-space part;
the others are skipped with a one-line note (in the output and on stdout). Logits are divided by the run's
temperature, as `evaluate` does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from lora_ensemble.analysis import (
    function_space,
    member_logits_and_features,
    member_pairs,
    path_curves,
    representation_similarity,
    weight_space,
)
from lora_ensemble.app.runner import WEIGHTS_FILE, Run, load_run
from lora_ensemble.core.ensemble import LoraEnsemble
from lora_ensemble.io import atomic_write_bytes
from lora_ensemble.lightning.module import model_inputs
from lora_ensemble.metrics import evaluate

SPLITS = ("test", "val", "train")
OUTPUT_NAME = "analysis.json"


def check_run_folder(run_dir: str) -> None:
    """One clear error for a --checkpoint that is not a run folder (before anything loads)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--checkpoint {run_dir}: no such folder; name a run folder written by "
                                "`lora-ensemble fit`")
    for name in ("run_config.yaml", WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"--checkpoint {run_dir} is not a run folder: it has no {name} (a run folder is "
                                    "written by `lora-ensemble fit`)")


def _batches(run: Run, split: str, limit: int | None = None) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(model inputs, labels) of the split's batches, on the method's device; at most `limit` samples."""
    loader = run.loader(split)
    if loader is None:
        raise ValueError(f"--split {split}: the run's data has no {split} samples")
    device = next(run.module.method.parameters()).device
    seen = 0
    for batch in loader:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
        labels = batch["labels"]
        if limit is not None and seen + len(labels) > limit:
            keep = limit - seen
            inputs = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == len(labels) else v
                      for k, v in inputs.items()}
            labels = labels[:keep]
        if len(labels):
            yield inputs, labels
        seen += len(labels)
        if limit is not None and seen >= limit:
            return


def read_control(path: str, ensemble: LoraEnsemble) -> dict[str, torch.Tensor]:
    """An earlier snapshot of the same run (a weights.safetensors as `fit` writes it) as {name: (M, ...)} under
    `ensemble.member_parameters()`'s names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--control {path} cannot be read as a weights file ({e})") from None
    own = ensemble.member_parameters()
    state = {n: tensors.get(f"method.model.{n}") for n in own}
    wrong = [n for n, t in state.items() if t is None or t.shape != own[n].shape]
    if wrong:
        raise ValueError(f"--control {path} does not hold this run's member tensors (e.g. method.model.{wrong[0]}); "
                         "pass the weights.safetensors of an earlier snapshot of the same run")
    return state


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def analyze(run: Run, split: str = "test", control: str | None = None, num_points: int = 11,
            max_pairs: int | None = 10, path_samples: int | None = 256, max_rows: int = 4096) -> dict[str, Any]:
    """Every analysis number of a loaded run (see the module docstring), as JSON-safe Python values."""
    method, temperature = run.module.method, float(run.module.temperature)
    method.eval()
    lora = isinstance(method, LoraEnsemble) and method.num_members > 1 and bool(method.target_names)
    result: dict[str, Any] = {"method": run.config.method.name, "split": split, "temperature": temperature,
                              "num_members": int(getattr(method, "num_members", 1)), "notes": []}
    features = None
    with torch.no_grad():
        if lora:
            logits, labels, features = member_logits_and_features(method, _batches(run, split))
        else:
            parts = [(method(**inputs).float().cpu(), y) for inputs, y in _batches(run, split)]
            logits, labels = torch.cat([z for z, _ in parts], dim=1), torch.cat([y for _, y in parts])
    logits = logits / temperature
    result["metrics"] = {k: v for k, v in evaluate(logits, labels).items()}
    result["function_space"] = function_space(logits, labels)
    if not lora:
        why = ("it has one member" if result["num_members"] < 2 and isinstance(method, LoraEnsemble)
               else "it has no LoRA adapters")
        note = (f"weight space, mode connectivity and representations skipped: method {run.config.method.name!r} "
                f"is not a LoRA-Ensemble of 2 or more members ({why})")
        result["notes"].append(note)
        result.update(weight_space=None, connectivity=None, control=None, representations=None)
        return _clean(result)
    result["weight_space"] = weight_space(method)
    pairs = member_pairs(method.num_members, max_pairs)
    curves = path_curves(method, _batches(run, split, path_samples), pairs, num_points, temperature=temperature,
                         max_rows=max_rows)
    result["connectivity"] = curves
    if control is not None:
        members = list(range(min(method.num_members, 2)))
        result["control"] = path_curves(method, _batches(run, split, path_samples), [(m, m) for m in members],
                                        num_points, end_state=read_control(control, method), temperature=temperature,
                                        max_rows=max_rows)
        result["control"]["snapshot"] = control
    else:
        result["control"] = None
        result["notes"].append("no --control snapshot given: the same-member control curve is not computed")
    result["representations"] = representation_similarity(features)
    return _clean(result)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_plots(result: dict[str, Any], folder: str) -> list[str]:
    """The analysis figures of one run into `folder`; returns their paths."""
    from lora_ensemble.app import analysis_plots as plots

    os.makedirs(folder, exist_ok=True)
    fs, written = result["function_space"], []
    written.append(plots.disagreement_heatmap(fs["disagreement_matrix"], os.path.join(folder, "disagreement.png")))
    written.append(plots.diversity_accuracy_plane({result["method"]: fs["plane"]}, os.path.join(folder, "plane.png")))
    if result.get("connectivity"):
        written.append(plots.path_curves(result["connectivity"], result.get("control"),
                                         os.path.join(folder, "paths.png")))
    if result.get("representations"):
        written.append(plots.cka_per_block(result["representations"]["mean_cka"], os.path.join(folder, "cka.png")))
    return [str(p) for p in written]


def run_analyze(run_dir: str, split: str = "test", plots: str | None = None, output: str | None = None,
                overrides: list[str] | None = None, control: str | None = None, num_points: int = 11,
                max_pairs: int | None = 10, path_samples: int | None = 256) -> dict[str, Any]:
    """The `analyze` command: load, analyse, write the JSON (and the figures); prints one summary line, the notes
    and what it wrote."""
    check_run_folder(run_dir)
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    if control is not None and not os.path.isfile(control):
        raise FileNotFoundError(f"--control {control}: no such file")
    run = load_run(run_dir, overrides)
    result = analyze(run, split, control, num_points, max_pairs, path_samples)
    out = output or os.path.join(run_dir, OUTPUT_NAME)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    fs = result["function_space"]
    summary = f"{result['method']}: disagreement {_num(fs['disagreement'])}, JS {_num(fs['js'])}"
    if result["weight_space"] is not None:
        summary += (f", dW cosine {_num(result['weight_space']['mean_cosine'])}, mean barrier "
                    f"{_num(result['connectivity']['mean_barrier'])}")
        if result["control"] is not None:
            summary += f" (control {_num(result['control']['mean_barrier'])})"
    print(summary)
    for note in result["notes"]:
        print(f"note: {note}")
    if plots:
        write_plots(result, plots)
        print(f"wrote figures to {plots}")
    print(f"wrote {out}")
    return result
