"""Loaders for the user's own data: an image folder tree, CSV/TSV text files, a Hugging Face ``datasets`` dataset.

Whatever split the source lacks is carved, stratified and seeded, from its training data: ``test_fraction`` of
each class for test, ``val_fraction`` for val (see :func:`complete_splits` and ``_split.stratified_split``).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora_ensemble.app.data._io import IMAGE_EXTENSIONS, open_rgb, read_table
from lora_ensemble.app.data._split import check_fraction, stratified_split
from lora_ensemble.app.data.base import DatasetSplits, RawDataset

__all__ = ["load_image_folder", "load_csv", "load_hf_dataset"]

UNSEEN_MODES = ("error", "ood")

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
IMAGE_LAYOUT = "<root>/<class>/<image files> or <root>/{train,val,test}/<class>/<image files> (val/test optional)"


def complete_splits(
    given: dict[str, RawDataset], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, RawDataset]:
    """Fill in missing ``test`` / ``val`` splits by one stratified, seeded carve-out of ``given["train"]``.

    Fractions are of the given train split: with neither given, ``test_fraction`` and ``val_fraction`` of each
    class go to test and val and the rest stays train.
    """
    fractions = {
        "test": check_fraction("test_fraction", test_fraction),
        "val": check_fraction("val_fraction", val_fraction),
    }
    missing = [name for name in ("test", "val") if name not in given]
    splits = dict(given)
    if missing:
        *carved, rest = stratified_split(given["train"].labels, [fractions[name] for name in missing], seed)
        splits.update({name: given["train"].select(indices) for name, indices in zip(missing, carved)})
        splits["train"] = given["train"].select(rest)
    return splits


def _class_folder_images(folder: Path) -> dict[str, list[Path]]:
    """``{class: sorted image paths}`` for every sub-folder of ``folder`` (searched recursively)."""
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"class folder {class_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                f"expected {IMAGE_LAYOUT}"
            )
        classes[class_dir.name] = files
    if not classes:
        raise FileNotFoundError(f"{folder} has no class sub-folders; expected {IMAGE_LAYOUT}")
    return classes


def load_image_folder(
    root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits:
    """Load images laid out one folder per class, like ``torchvision.datasets.ImageFolder``.

    ``root/<class>/...`` is one pool split into train/val/test; ``root/train/<class>/...`` with optional
    ``root/val`` (or ``valid``, ``validation``) and ``root/test`` uses the given splits and carves the missing ones
    out of train. ``class_names`` are the class folder names of train, sorted; ``ids`` are paths relative to root.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {IMAGE_LAYOUT}")
    found = {
        split: next((root / n for n in names if (root / n).is_dir()), None) for split, names in SPLIT_FOLDERS.items()
    }
    if found["train"] is None:
        if found["val"] is not None or found["test"] is not None:
            raise FileNotFoundError(f"{root} has val/test folders but no train/ folder; expected {IMAGE_LAYOUT}")
        found = {"train": root}
    folders = {split: path for split, path in found.items() if path is not None}
    per_split = {split: _class_folder_images(path) for split, path in folders.items()}
    class_names = sorted(per_split["train"])
    given = {}
    for split, classes in per_split.items():
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"{folders[split]} has class folder(s) {unknown} that train does not have: {class_names}")
        paths = [path for name in class_names for path in classes.get(name, [])]
        labels = [k for k, name in enumerate(class_names) for _ in classes.get(name, [])]
        ids = [path.relative_to(root).as_posix() for path in paths]
        given[split] = RawDataset([str(p) for p in paths], labels, load=open_rgb, ids=ids)
    splits = complete_splits(given, val_fraction, test_fraction, seed)
    return DatasetSplits(**splits, class_names=class_names, modality="image")


def _csv_paths(path_or_paths) -> dict[str, Path]:
    if isinstance(path_or_paths, (str, Path)):
        return {"train": Path(path_or_paths)}
    if isinstance(path_or_paths, Mapping):
        unknown = sorted(set(path_or_paths) - set(SPLIT_FOLDERS))
        if unknown or "train" not in path_or_paths:
            raise ValueError(
                f"path_or_paths keys {sorted(path_or_paths)} are not valid; "
                "expected 'train' and optionally 'val', 'test'"
            )
        return {split: Path(p) for split, p in path_or_paths.items()}
    if isinstance(path_or_paths, Sequence) and len(path_or_paths) in (2, 3):
        names = ("train", "test") if len(path_or_paths) == 2 else ("train", "val", "test")
        return dict(zip(names, map(Path, path_or_paths)))
    raise ValueError(
        f"path_or_paths={path_or_paths!r} is not accepted; expected one file path, a dict with keys 'train' "
        "(required), 'val', 'test', or a (train, test) / (train, val, test) sequence of paths"
    )


def _label_ids(raw: list[str], class_names: Sequence[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Raw label strings -> ``(label ids, class names)``: all integers are used as is, else names map to ids."""
    if any(value == "" for value in raw):
        raise ValueError(f"{where}: {sum(value == '' for value in raw)} row(s) have an empty label")
    if all(re.fullmatch(r"\s*\d+\s*", value) for value in raw):
        labels = [int(value) for value in raw]
        names = list(class_names) if class_names is not None else [str(k) for k in range(max(labels) + 1)]
        if max(labels) >= len(names):
            raise ValueError(f"{where}: integer label {max(labels)} has no name in class_names={names}")
        return labels, names
    names = list(class_names) if class_names is not None else sorted(set(raw))
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{where}: label value(s) {unknown[:5]} are not in class_names={names}")
    return [names.index(value) for value in raw], names


def unseen_label_rows(labels: Mapping[str, Sequence], files: Mapping[str, str], mode: str) -> dict[str, list[int]]:
    """Rows of the val/test splits whose label no training row has, ``{split: row indices}``.

    Such a label would become a class the model never trains on. ``mode="error"`` refuses it, naming the label
    and the file; ``mode="ood"`` returns the rows, for the caller to move them to the out-of-distribution set.
    """
    if mode not in UNSEEN_MODES:
        raise ValueError(f"unseen_test_labels={mode!r} is not accepted; expected 'error' (refuse labels that no "
                         "training row has) or 'ood' (treat their rows as out-of-distribution data)")
    seen = set(labels["train"])
    found = {}
    for split, values in labels.items():
        rows = [i for i, value in enumerate(values) if value not in seen] if split != "train" else []
        if rows:
            found[split] = rows
    if found and mode == "error":
        split, rows = next(iter(found.items()))
        unseen = sorted({str(labels[split][i]) for i in rows})
        raise ValueError(
            f"label(s) {unseen[:5]} of {files[split]} ({len(rows)} {split} row(s)) appear in no row of the training "
            f"data {files['train']}: the model would get a class it never trains on. Remove those rows, add "
            "training rows with that label, or set unseen_test_labels: ood (data.unseen_test_labels in a run "
            "config) to evaluate them as out-of-distribution data"
        )
    return found


def load_csv(
    path_or_paths,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    unseen_test_labels: str = "error",
) -> DatasetSplits:
    """Load a text-classification task from CSV files (``.tsv``/``.tab`` files are read tab-separated).

    Args:
        path_or_paths: one file (split into train/val/test), a dict ``{"train": ..., "val": ..., "test": ...}``
            (``val``/``test`` optional, carved from train when absent), or a ``(train, test)`` or
            ``(train, val, test)`` sequence of paths.
        text_column, label_column: header names of the input text and of the label.
        class_names: names of the labels. If every label is a non-negative integer it is the class index
            (default names ``"0" .. str(max)``); otherwise labels are names, mapped to their position in
            ``class_names`` (default: the sorted distinct labels of all files).
        val_fraction, test_fraction: share of train carved out for missing val / test splits.
        seed: the same seed always gives the same split.
        unseen_test_labels: a val/test row whose label no training row has is refused (``"error"``, naming the
            label and the file) or moved, with label ``-1``, to the out-of-distribution set ``ood`` (``"ood"``).
    """
    paths = _csv_paths(path_or_paths)
    layout = f"a header row with columns {text_column!r} and {label_column!r}, one example per row"
    tables = {}
    for split, path in paths.items():
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        tables[split] = read_table(path, (text_column, label_column), layout, delimiter=delimiter)
    values = {split: [row[label_column].strip() for row in rows] for split, rows in tables.items()}
    for split, labels in values.items():
        if "" in labels:
            count = labels.count("")
            raise ValueError(f"column {label_column!r} of {paths[split]}: {count} row(s) have an empty label")
    integer = all(re.fullmatch(r"\d+", v) for labels in values.values() for v in labels)
    keys = {split: [int(v) if integer else v for v in labels] for split, labels in values.items()}
    unseen = unseen_label_rows(keys, {split: str(path) for split, path in paths.items()}, unseen_test_labels)
    ood_texts = []
    for split, rows in unseen.items():
        drop = set(rows)
        ood_texts += [tables[split][i][text_column] for i in rows]
        tables[split] = [row for i, row in enumerate(tables[split]) if i not in drop]
        if not tables[split]:
            raise ValueError(f"{paths[split]} has no row with a label of the training data; nothing is left to "
                             f"{split} on")
    raw = [row[label_column].strip() for rows in tables.values() for row in rows]
    labels, names = _label_ids(raw, class_names, f"column {label_column!r} of {', '.join(map(str, paths.values()))}")
    given, start = {}, 0
    for split, rows in tables.items():
        given[split] = RawDataset([row[text_column] for row in rows], labels[start : start + len(rows)])
        start += len(rows)
    splits = complete_splits(given, val_fraction, test_fraction, seed)
    if len(names) < 2:
        raise ValueError(f"column {label_column!r} has a single class {names}; classification needs at least 2")
    ood = RawDataset(ood_texts, [-1] * len(ood_texts)) if ood_texts else None
    return DatasetSplits(**splits, class_names=names, modality="text", ood=ood)


HF_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


def _unlabelled(values: list) -> bool:
    """True for a split whose labels are all negative ints (GLUE test sets are labelled -1)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v < 0 for v in values)


def _hf_item(dataset: Any, column: str, index: int):
    """``dataset[index][column]`` as an RGB PIL image (decoded on access, so big datasets stay on disk)."""
    return dataset[int(index)][column].convert("RGB")


def _hf_ref_item(source: tuple[Any, str, int]):
    """``(dataset, column, index)`` -> that item as an RGB PIL image (OOD items gathered from several splits)."""
    return _hf_item(*source)


def load_hf_dataset(
    name_or_path: str,
    text_column: str = "text",
    label_column: str = "label",
    image_column: str | None = None,
    config: str | None = None,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
    unseen_test_labels: str = "error",
) -> DatasetSplits:
    """Load a classification dataset with Hugging Face ``datasets.load_dataset(name_or_path, config)``.

    Needs ``pip install datasets``. Offline, the dataset must already be in the ``datasets`` cache (load it once
    online; set ``HF_DATASETS_OFFLINE=1``) or ``name_or_path`` must be a local folder/file.

    Splits named ``train``, ``validation``/``val``/``valid``/``dev`` and ``test`` are used; a split without the
    label column or whose labels are all negative (GLUE's unlabelled test sets use ``-1``) counts as missing, and
    missing val/test splits are carved from train. Class names come from a ``ClassLabel`` feature, else as in :func:`load_csv`.

    Args:
        text_column: input text column (modality ``"text"``); ignored when ``image_column`` is given.
        image_column: input image column (an ``Image`` feature; modality ``"image"``, decoded lazily).
        label_column: the label column (``ClassLabel`` or plain ints/strings).
        unseen_test_labels: as in :func:`load_csv`: a val/test label no training row has is refused (``"error"``)
            or its rows become the out-of-distribution set (``"ood"``).
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "load_hf_dataset needs the Hugging Face 'datasets' package: pip install datasets "
            "(or export your data to CSV and use load_csv / load_image_folder)"
        ) from error
    try:
        loaded = datasets.load_dataset(str(name_or_path), config, cache_dir=cache_dir)
    except OSError as error:  # includes FileNotFoundError, ConnectionError and the hub's offline errors
        raise FileNotFoundError(
            f"datasets.load_dataset({str(name_or_path)!r}, {config!r}) failed: {type(error).__name__}: {error}. "
            "Offline, a Hub dataset must already be cached (load it once online, then set HF_DATASETS_OFFLINE=1); "
            "or pass a local folder or data file path"
        ) from error
    input_column = image_column or text_column
    found = {}
    for split, names in HF_SPLITS.items():
        name = next((n for n in names if n in loaded), None)
        if name is not None:
            found[split] = loaded[name]
    if "train" not in found:
        raise ValueError(f"{name_or_path!r} has splits {sorted(loaded)}; expected a 'train' split")
    for split, dataset in list(found.items()):
        if split != "train" and label_column not in dataset.column_names:
            del found[split]  # an unlabelled split (e.g. a competition test set) is carved from train instead
            continue
        missing = [c for c in (input_column, label_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"split {split!r} of {name_or_path!r} lacks column(s) {missing}; its columns are "
                f"{dataset.column_names} (set text_column= / image_column= / label_column=)"
            )
    feature = getattr(found["train"], "features", {}).get(label_column)
    raw = {split: list(dataset[label_column]) for split, dataset in found.items()}
    found = {split: d for split, d in found.items() if split == "train" or not _unlabelled(raw[split])}
    keys = {split: [str(v).strip() for v in raw[split]] for split in found}
    unseen = unseen_label_rows(keys, {s: f"split {s!r} of {name_or_path!r}" for s in found}, unseen_test_labels)
    keep = {split: sorted(set(range(len(raw[split]))) - set(unseen.get(split, ()))) for split in found}
    for split, rows in keep.items():
        if not rows:
            raise ValueError(f"split {split!r} of {name_or_path!r} has no row with a label of the training data")
    ood_rows = [(found[split], i) for split, rows in unseen.items() for i in rows]
    raw = {split: [raw[split][i] for i in keep[split]] for split in found}
    if getattr(feature, "names", None) is not None:
        names = list(class_names) if class_names is not None else list(feature.names)
        labels = {split: [int(v) for v in raw[split]] for split in found}
    else:
        flat = [str(v).strip() for split in found for v in raw[split]]
        ids, names = _label_ids(flat, class_names, f"column {label_column!r} of {name_or_path!r}")
        labels, start = {}, 0
        for split in found:
            labels[split], start = ids[start : start + len(raw[split])], start + len(raw[split])
    given = {}
    for split, dataset in found.items():
        if image_column:
            load = partial(_hf_item, dataset, image_column)
            given[split] = RawDataset(keep[split], labels[split], load=load)
        else:
            texts = list(dataset[text_column])
            given[split] = RawDataset([texts[i] for i in keep[split]], labels[split])
    ood = None
    if ood_rows and image_column:
        ood = RawDataset([(d, image_column, i) for d, i in ood_rows], [-1] * len(ood_rows), load=_hf_ref_item)
    elif ood_rows:
        ood = RawDataset([d[int(i)][text_column] for d, i in ood_rows], [-1] * len(ood_rows))
    splits = complete_splits(given, val_fraction, test_fraction, seed)
    return DatasetSplits(**splits, class_names=names, modality="image" if image_column else "text", ood=ood)
