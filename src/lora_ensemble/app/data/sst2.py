"""SST-2 (GLUE): binary sentiment of movie-review sentences, from the GLUE ``SST-2`` folder.

Expected layout (``root`` may be ``SST-2/`` or the folder that contains it)::

    SST-2/train.tsv   header "sentence<TAB>label", 67,349 rows, label 0 = negative, 1 = positive
    SST-2/dev.tsv     same format, 872 rows

The GLUE ``test.tsv`` has no labels, so ``dev.tsv`` is the test set (as in most papers) and ``val`` is a
stratified ``val_fraction`` of ``train.tsv`` (see ``_split.stratified_split``).
"""

from __future__ import annotations

from pathlib import Path

from lora_ensemble.app.data._io import read_table
from lora_ensemble.app.data._split import check_fraction, stratified_split
from lora_ensemble.app.data.base import DatasetSplits, RawDataset

SST2_CLASSES = ("negative", "positive")
LAYOUT = "SST-2/train.tsv and SST-2/dev.tsv, tab-separated with header 'sentence<TAB>label' and labels 0/1"


def _read_split(path: Path) -> tuple[list[str], list[int]]:
    """``path`` (a GLUE SST-2 TSV) -> ``(sentences, labels in {0, 1})``."""
    rows = read_table(path, ("sentence", "label"), LAYOUT, delimiter="\t")
    bad = sorted({row["label"] for row in rows if row["label"].strip() not in ("0", "1")})
    if bad:
        raise ValueError(f"{path}: label values {bad[:5]} are not 0/1; expected {LAYOUT}")
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def load_sst2(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """Load GLUE SST-2: ``train`` = ``train.tsv`` minus ``val``, ``val`` = stratified ``val_fraction`` of it,
    ``test`` = ``dev.tsv``. ``class_names = ["negative", "positive"]``.
    """
    check_fraction("val_fraction", val_fraction)
    root = Path(root)
    folder = root if (root / "train.tsv").is_file() or not (root / "SST-2").is_dir() else root / "SST-2"
    train = RawDataset(*_read_split(folder / "train.tsv"))
    val_idx, train_idx = stratified_split(train.labels, [val_fraction], seed)
    return DatasetSplits(
        train=train.select(train_idx),
        val=train.select(val_idx),
        test=RawDataset(*_read_split(folder / "dev.tsv")),
        class_names=list(SST2_CLASSES),
        modality="text",
    )
