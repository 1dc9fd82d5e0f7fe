"""HAM10000 (Tschandl et al., 2018): 10,015 dermatoscopic images of 7 skin-lesion types, split by lesion.

Expected layout::

    <root>/HAM10000_metadata.csv          columns lesion_id, image_id, dx, ... (one row per image)
    <root>/HAM10000_images_part_1/<image_id>.jpg
    <root>/HAM10000_images_part_2/<image_id>.jpg
      (or any sub-folders of <root>, or the .jpg files directly in <root>)

Several images often show the same lesion (7,470 lesions for 10,015 images). To keep near-duplicate images out of
the test set, the split is by ``lesion_id``: sorted unique lesions, stratified by their ``dx``, are permuted with
``seed``; ``test_fraction`` / ``val_fraction`` of the lesions of each class (with all their images) form test / val.
The classes are very imbalanced (``nv`` ~67%); use ``splits.class_weights()`` for a weighted cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_ensemble.app.data._io import IMAGE_EXTENSIONS, open_rgb, read_table
from lora_ensemble.app.data._split import check_fraction, grouped_stratified_split
from lora_ensemble.app.data.base import DatasetSplits, RawDataset

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA = "HAM10000_metadata.csv"
LAYOUT = (
    "<root>/HAM10000_metadata.csv (columns lesion_id, image_id, dx) and <root>/HAM10000_images_part_1/, "
    "<root>/HAM10000_images_part_2/ (or <root>/ itself) holding <image_id>.jpg"
)


def _read_metadata(path: Path) -> tuple[list[str], list[str], list[str]]:
    """-> lesion ids, image ids, dx strings, one per row."""
    rows = read_table(path, ("lesion_id", "image_id", "dx"), LAYOUT)
    bad = sorted({row["dx"] for row in rows if row["dx"].strip() not in HAM10000_CLASSES})
    if bad:
        raise ValueError(f"{path}: unknown dx value(s) {bad}; expected one of {HAM10000_CLASSES}")
    return [r["lesion_id"] for r in rows], [r["image_id"] for r in rows], [r["dx"].strip() for r in rows]


def _index_images(root: Path) -> dict[str, Path]:
    """``{image stem: path}`` for image files in ``root`` and its direct sub-folders."""
    index: dict[str, Path] = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                index.setdefault(path.stem, path)
    return index


def load_ham10000(
    root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """Load HAM10000 as image splits where no lesion is in two splits (see the module docstring).

    Args:
        root: folder with ``HAM10000_metadata.csv`` and the images.
        val_fraction, test_fraction: fraction of each class's *lesions* (not images) in val / test.
        seed: the same seed always gives the same split.

    Returns:
        ``DatasetSplits(modality="image")`` with ``class_names = ["akiec", "bcc", "bkl", "df", "mel", "nv",
        "vasc"]``; each split's ``ids`` are image ids and ``lesion_ids`` the matching lesion ids.
    """
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"HAM10000 root {root} is not a folder; expected {LAYOUT}")
    lesions, image_ids, dxs = _read_metadata(root / METADATA)
    index = _index_images(root)
    missing = [image_id for image_id in image_ids if image_id not in index]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {METADATA} are not in {root}, e.g. {missing[:3]}; expected {LAYOUT}"
        )
    labels = np.asarray([HAM10000_CLASSES.index(dx) for dx in dxs])
    test_idx, val_idx, train_idx = grouped_stratified_split(lesions, labels, [test_fraction, val_fraction], seed)
    everything = RawDataset([str(index[i]) for i in image_ids], labels, load=open_rgb, ids=image_ids)

    def part(indices: np.ndarray) -> RawDataset:
        dataset = everything.select(indices)
        dataset.lesion_ids = [lesions[i] for i in indices]
        return dataset

    return DatasetSplits(
        train=part(train_idx),
        val=part(val_idx),
        test=part(test_idx),
        class_names=list(HAM10000_CLASSES),
        modality="image",
    )
