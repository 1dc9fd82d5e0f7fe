"""ESC-50 (Piczak, 2015): 2,000 five-second environmental sound clips, 50 classes, 5 predefined folds.

Expected layout (the GitHub release ``ESC-50-master``)::

    <root>/meta/esc50.csv      columns filename, fold, target, category, ... (one row per clip)
    <root>/audio/<filename>    44.1 kHz mono 16-bit PCM WAV

The standard protocol is 5-fold cross-validation over the predefined folds (clips from one source recording never
straddle folds): ``test_fold`` is the test set, ``val_fold`` (optional) the validation set, the other folds train.
Waveforms are read with the stdlib ``wave`` module and resampled on access when ``sample_rate`` differs from the
file's rate (``scipy.signal.resample_poly``; linear interpolation without scipy, see ``_io.resample``).
"""

from __future__ import annotations

import wave
from functools import partial
from pathlib import Path

import numpy as np

from lora_ensemble.app.data._io import read_table, read_waveform
from lora_ensemble.app.data.base import DatasetSplits, RawDataset

LAYOUT = "<root>/meta/esc50.csv (columns filename, fold, target, category) and <root>/audio/<filename>.wav"
COLUMNS = ("filename", "fold", "target", "category")


def _read_meta(path: Path) -> list[dict[str, str]]:
    rows = read_table(path, COLUMNS, LAYOUT)
    for row in rows:
        if not (row["fold"].strip().isdigit() and row["target"].strip().isdigit()):
            raise ValueError(
                f"{path}: row {row['filename']!r} has fold={row['fold']!r}, target={row['target']!r}; expected ints"
            )
    return rows


def _class_names(rows: list[dict[str, str]], path: Path) -> list[str]:
    """``names[target] = category``, checking that each target has one category and targets are 0..C-1."""
    names: dict[int, str] = {}
    for row in rows:
        target, category = int(row["target"]), row["category"]
        if names.setdefault(target, category) != category:
            raise ValueError(f"{path}: target {target} is both {names[target]!r} and {category!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: targets {sorted(names)} are not 0..{len(names) - 1}")
    return [names[t] for t in range(len(names))]


def load_esc50(
    root: str | Path, test_fold: int = 1, val_fold: int | None = None, sample_rate: int | None = 16000
) -> DatasetSplits:
    """Load one ESC-50 cross-validation split as 1-D float32 waveforms.

    Args:
        root: the ``ESC-50-master`` folder (see the module docstring for the layout).
        test_fold: fold (1..5) used as ``test``.
        val_fold: fold used as ``val``; ``None`` gives an empty ``val`` and trains on the 4 other folds (the
            paper protocol: report the test fold, average over ``test_fold = 1..5``).
        sample_rate: rate in Hz the waveforms are resampled to (16,000 = what AST/HuBERT/Wav2Vec2 extractors
            expect); ``None`` keeps the files' rate (44,100 Hz for ESC-50, read from the first file).

    Returns:
        ``DatasetSplits(modality="audio")`` whose ``class_names[target]`` is the ``category`` of that target in
        ``esc50.csv`` (``class_names[0] == "dog"``); each split's ``ids`` are file names.
    """
    root = Path(root)
    meta_path = root / "meta" / "esc50.csv"
    rows = _read_meta(meta_path)
    class_names = _class_names(rows, meta_path)
    folds = sorted({int(row["fold"]) for row in rows})
    if test_fold not in folds:
        raise ValueError(f"test_fold={test_fold!r} is not a fold of {meta_path}; expected one of {folds}")
    if val_fold is not None and (val_fold not in folds or val_fold == test_fold):
        others = [f for f in folds if f != test_fold]
        raise ValueError(f"val_fold={val_fold!r} must be None or a fold other than test_fold={test_fold}: {others}")
    if sample_rate is not None and (not isinstance(sample_rate, int) or sample_rate <= 0):
        raise ValueError(f"sample_rate={sample_rate!r} must be a positive int (Hz) or None")

    paths = [root / "audio" / row["filename"] for row in rows]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} clip(s) listed in {meta_path} are missing from {root / 'audio'}, e.g. {missing[:3]}; "
            f"expected {LAYOUT}"
        )
    if sample_rate is None:
        with wave.open(str(paths[0]), "rb") as file:
            sample_rate = file.getframerate()

    fold = np.asarray([int(row["fold"]) for row in rows])
    everything = RawDataset(
        [str(p) for p in paths],
        [int(row["target"]) for row in rows],
        load=partial(read_waveform, sample_rate=sample_rate),
        ids=[row["filename"] for row in rows],
    )
    is_val = fold == val_fold if val_fold is not None else np.zeros(len(rows), dtype=bool)
    is_test = fold == test_fold
    return DatasetSplits(
        train=everything.select(np.flatnonzero(~is_test & ~is_val)),
        val=everything.select(np.flatnonzero(is_val)),
        test=everything.select(np.flatnonzero(is_test)),
        class_names=class_names,
        modality="audio",
        sample_rate=sample_rate,
    )
