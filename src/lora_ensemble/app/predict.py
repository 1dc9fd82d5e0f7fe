"""`lora-ensemble predict`: per-sample prediction, probability and uncertainty of a finished run.

For every input: the predicted class, its probability under the ensemble predictive
p = 1/M sum_m softmax(z_m), and the uncertainty decomposition (nats)

    total = H[p],  aleatoric = 1/M sum_m H[softmax(z_m)],  epistemic = total - aleatoric (mutual information)

plus the probability of every class. Written as CSV or JSON lines. A multiple-choice run (data.kind:
multiple_choice) reads questions from a .jsonl input, {"question": str, "choices": [str] * K[, "id": ...]} per
line, predicts a choice position ("A", "B", ...) and adds the chosen text as "choice".
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_ensemble.app.run_config import ConfigError
from lora_ensemble.io import atomic_write_bytes
from lora_ensemble.metrics import predictive

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def read_inputs(path: str, modality: str, sample_rate: int | None = None,
                num_choices: int | None = None) -> list[tuple[str, Any]]:
    """(id, raw input) pairs from a file or folder; see `lora-ensemble predict --help` for the layouts.
    `num_choices` (a multiple-choice run): a .jsonl input holds questions {"question", "choices"[, "id"]} with
    that many choices each (an "answer" field is ignored)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--input {path!r} not found")
    try:
        if num_choices is not None and p.suffix == ".jsonl":
            return _read_questions(p, num_choices)
        return _read_inputs(p, path, modality, sample_rate)
    except UnicodeDecodeError as e:
        from lora_ensemble.app.data._io import not_utf8

        raise ConfigError(f"--input {not_utf8(path, e)}") from None
    except OSError as e:  # an unreadable image or audio file, a folder without permission
        raise ConfigError(f"--input {path}: {e}") from None


def _read_questions(p: Path, num_choices: int) -> list[tuple[str, Any]]:
    from lora_ensemble.app.data.multiple_choice import read_jsonl_questions

    ids: list[str] = []
    try:
        items, _ = read_jsonl_questions(p, need_answer=False, num_choices=num_choices, ids=ids)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--input {e}") from None
    return list(zip(ids, items))


def _read_inputs(p: Path, path: str, modality: str, sample_rate: int | None) -> list[tuple[str, Any]]:
    if modality == "text":
        if p.suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if "text" not in (reader.fieldnames or []):
                    raise ConfigError(f"{path}: a CSV input needs a 'text' column, found {reader.fieldnames}")
                return [(row.get("id") or str(i), row["text"]) for i, row in enumerate(reader)]
        if p.suffix == ".jsonl":
            items = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}, line {i + 1}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or "text" not in record:
                        raise ConfigError(f"{path}, line {i + 1}: a JSON lines input needs a 'text' field")
                    items.append((str(record.get("id", i)), record["text"]))
            return items
        return [(str(i), line) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if line.strip()]
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else (
        [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".txt" else [p])
    if modality == "image":
        from PIL import Image

        return [(str(f), Image.open(f).convert("RGB")) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    from lora_ensemble.app.data._io import read_waveform

    return [(str(f), read_waveform(f, sample_rate)) for f in files if f.suffix.lower() == ".wav"]


@torch.no_grad()
def predict_items(run: Any, items: list[tuple[str, Any]], batch_size: int = 32,
                  member_logits: Callable[[list[dict]], Tensor] | None = None) -> list[dict[str, Any]]:
    """One row per item: the prediction, its probability, total / aleatoric / epistemic uncertainty and p_<class>.
    `member_logits(batches) -> (M, N, C)` replaces the run's ensemble on all N items' batches (the sampled members
    run in chunks, `app.posterior.sampled_member_logits`); by default each batch runs through run.module.method."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    names = run.info.class_names
    batches = []
    for start in range(0, len(items), batch_size):
        batch = run.collate([(x, 0) for _, x in items[start:start + batch_size]])
        batch.pop("labels")
        batches.append(batch)
    if member_logits is None:
        method = run.module.method.eval()
        logits = torch.cat([method(**batch).float() for batch in batches], dim=1)   # (M, N, C)
    else:
        logits = member_logits(batches).float()
    pred = predictive(logits / run.module.temperature)
    rows = []
    for i, (item_id, raw) in enumerate(items):
        k = int(pred.probs[i].argmax())
        choice = {"choice": raw["choices"][k]} if isinstance(raw, dict) and "choices" in raw else {}
        rows.append({"id": item_id, "prediction": names[k], **choice, "probability": float(pred.probs[i, k]),
                     "total": float(pred.total[i]), "aleatoric": float(pred.aleatoric[i]),
                     "epistemic": float(pred.epistemic[i]),
                     **{f"p_{c}": float(pred.probs[i, j]) for j, c in enumerate(names)}})
    return rows


def check_output(output: str | None) -> None:
    """--output must be a .csv or .jsonl file name (not a folder)."""
    if output is None:
        return
    if os.path.isdir(output):
        raise ConfigError(f"--output {output!r} is a folder; name a .csv or .jsonl file")
    if os.path.splitext(output)[1].lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {output!r}: unknown extension; use .csv (a table) or .jsonl (JSON lines)")


def predict_file(checkpoint: str, input_path: str, output: str | None, batch_size: int = 32,
                 samples: int | None = None, member_chunk_size: int | None = None) -> list[dict[str, Any]]:
    """`samples`: K draws per member from the run's posterior (training.posterior), `member_chunk_size` of
    them per pass (the same predictions at the memory of a chunk)."""
    from lora_ensemble.app.runner import load_run

    check_output(output)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if member_chunk_size is not None and samples is None:
        raise ConfigError("--member-chunk-size runs the sampled members of --samples K in chunks; it needs --samples")
    run = load_run(checkpoint, with_data=False)
    member_logits = None
    if samples is not None:
        from lora_ensemble.app.posterior import sampled_member_logits, use_posterior_samples

        if member_chunk_size is None:
            use_posterior_samples(run, checkpoint, samples)
        else:
            member_logits = sampled_member_logits(run, checkpoint, samples, member_chunk_size)
    multiple_choice = run.config.data.kind == "multiple_choice"
    own_choices = multiple_choice and getattr(run.collate, "choices", ()) is None
    if own_choices and Path(input_path).suffix != ".jsonl":
        raise ConfigError(f"--input {input_path!r}: this run answers questions that bring their own choices; give a "
                          '.jsonl file with {"question": str, "choices": [str, ...]} on every line')
    items = read_inputs(input_path, run.info.modality, run.info.sample_rate,
                        num_choices=run.info.num_classes if multiple_choice else None)
    if not items:
        raise ConfigError(f"--input {input_path!r} holds no {run.info.modality} inputs")
    rows = predict_items(run, items, batch_size, member_logits)
    if output is None:
        for row in rows:
            print(json.dumps(row))
    elif output.lower().endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(output, buffer.getvalue().encode())
    else:
        atomic_write_bytes(output, "".join(json.dumps(r) + "\n" for r in rows).encode())
    if output is not None:
        print(f"wrote {len(rows)} predictions to {os.fspath(output)}")
    return rows
