"""Multiple-choice questions from a local JSONL file: one JSON object per line,

    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome", "Madrid"], "answer": 0}

`answer` is the index of the right choice. Every row has the same number K of choices (a dataset of fixed
K: the class logits are (M, B, K)); `class_names` are the choice positions "A", "B", ... Items are
`({"question": str, "choices": [str] * K}, answer)`, modality "text", for `data.kind: multiple_choice`
(`ChoiceCollator` in prompts.py). Test and val are carved from `path` stratified by answer, seeded (as the CSV
loader does); `ood_path` holds out-of-distribution questions of the same K (their `answer` is optional and
ignored: label -1).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from lora_ensemble.app.data.base import DatasetSplits, RawDataset
from lora_ensemble.app.data.generic import complete_splits

FIELDS = ("question", "choices", "answer")
LAYOUT = '{"question": str, "choices": [str, ...], "answer": int} on every line'


def read_jsonl_questions(path: str | Path, need_answer: bool = True, num_choices: int | None = None,
                         ids: list[str] | None = None) -> tuple[list[dict], list[int]]:
    """(items {question, choices}, answers) of a JSONL file; ValueError naming the line of a bad row (missing
    field, wrong type, answer out of range, another number of choices than the file's first row or
    `num_choices`; TypeError for a line that is not a JSON object), FileNotFoundError for a missing file. Blank
    lines are skipped; answers are -1 without `need_answer`. `ids`, if given, receives each question's id: its
    row's "id" field, or its 0-based line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist; expected JSONL with {LAYOUT}")
    items, answers, first = [], [], None
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); expected {LAYOUT}") from None
            if not isinstance(row, dict):
                raise TypeError(f"{where} is a JSON {type(row).__name__}, not an object; expected {LAYOUT}")
            missing = [k for k in FIELDS if k not in row and (need_answer or k != "answer")]
            if missing:
                raise ValueError(f"{where} lacks field(s) {missing}; expected {LAYOUT}")
            question, choices = row["question"], row["choices"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: question must be a non-empty string, got {question!r}")
            if not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, str) and c.strip() for c in choices):
                raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r}")
            expected = num_choices if num_choices is not None else first[1] if first else None
            if expected is not None and len(choices) != expected:
                since = f"the training file has {num_choices}" if num_choices is not None else \
                    f"line {first[0]} has {first[1]}"
                raise ValueError(f"{where} has {len(choices)} choices but {since}; a multiple-choice dataset has one "
                                 "fixed number of choices per question")
            first = first or (number, len(choices))
            answer = row.get("answer")
            if need_answer and (not isinstance(answer, int) or isinstance(answer, bool)
                                or not 0 <= answer < len(choices)):
                raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices "
                                 f"(an integer 0..{len(choices) - 1})")
            items.append({"question": question, "choices": list(choices)})
            answers.append(int(answer) if need_answer else -1)
            if ids is not None:
                ids.append(str(row.get("id", number - 1)))
    if not items:
        raise ValueError(f"multiple-choice file {path} holds no questions; expected JSONL with {LAYOUT}")
    return items, answers


def load_jsonl_multiple_choice(path: str | Path, ood_path: str | Path | None = None, val_fraction: float = 0.1,
                               test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Multiple-choice splits from the JSONL file `path` (see the module docstring).

    Args:
        path: the questions; `test_fraction` and `val_fraction` of each answer position go to test and val
            (stratified, seeded), the rest is train.
        ood_path: optional out-of-distribution questions (same number of choices), label -1.
        seed: the same seed always gives the same split.

    Returns:
        `DatasetSplits(modality="text")` with `class_names` the choice positions ["A", "B", ...] and `ids`
        "question N" (the N-th question of its file, 1-based; "ood question N" in `ood`).
    """
    items, answers = read_jsonl_questions(path)
    K = len(items[0]["choices"])
    if K > len(string.ascii_uppercase):
        raise ValueError(f"{path}: {K} choices per question; at most {len(string.ascii_uppercase)} are named")
    ids = [f"question {i + 1}" for i in range(len(items))]
    splits = complete_splits({"train": RawDataset(items, answers, ids=ids)}, val_fraction, test_fraction, seed)
    ood = None
    if ood_path is not None:
        ood_items, ood_labels = read_jsonl_questions(ood_path, need_answer=False, num_choices=K)
        ood = RawDataset(ood_items, ood_labels, ids=[f"ood question {i + 1}" for i in range(len(ood_items))])
    return DatasetSplits(train=splits["train"], val=splits["val"], test=splits["test"],
                         class_names=list(string.ascii_uppercase[:K]), modality="text", ood=ood)
