"""CIFAR-10 and CIFAR-100 from the official "python version" pickle batches (no torchvision needed).

Expected layouts (``root`` may be the folder itself or the folder that contains it)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each batch is a pickled dict with ``data: (N, 3072) uint8`` (row = 1024 red, 1024 green, 1024 blue values of a
32x32 image, row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the meta file holds
``label_names`` / ``fine_label_names``. Items are 32x32 RGB PIL images. The official test set is ``test``; ``val``
is a stratified ``val_fraction`` of the official training set (see ``_split.stratified_split``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from lora_ensemble.app.data._io import array_to_image
from lora_ensemble.app.data._split import check_fraction, stratified_split
from lora_ensemble.app.data.base import DatasetSplits, RawDataset

CIFAR10 = {
    "folder": "cifar-10-batches-py",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "meta": "batches.meta",
    "labels": "labels",
    "names": "label_names",
}
CIFAR100 = {
    "folder": "cifar-100-python",
    "train": ["train"],
    "test": ["test"],
    "meta": "meta",
    "labels": "fine_labels",
    "names": "fine_label_names",
}


def _layout(spec: dict) -> str:
    files = ", ".join(spec["train"] + spec["test"] + [spec["meta"]])
    return f"{spec['folder']}/{{{files}}}"


def _find_folder(root: str | Path, spec: dict) -> Path:
    root = Path(root)
    for folder in (root, root / spec["folder"]):
        if (folder / spec["meta"]).is_file():
            return folder
    raise FileNotFoundError(
        f"no CIFAR data in {root}: expected {_layout(spec)} (root may be {spec['folder']}/ or its parent); "
        "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _unpickle(path: Path) -> dict[str, object]:
    """Load one batch with ``bytes`` keys (as written by Python 2) decoded to ``str``."""
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR file {path}")
    with open(path, "rb") as file:
        try:
            raw = pickle.load(file, encoding="bytes")
        except Exception as error:
            raise ValueError(f"{path} is not a readable CIFAR pickle batch ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}; expected a pickled dict")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in raw.items()}


def _read_batches(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """-> ``images: (N, 32, 32, 3) uint8``, ``labels: (N,) int64``."""
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        for key in ("data", label_key):
            if key not in batch:
                raise ValueError(
                    f"{folder / name} has no {key!r} entry (keys: {sorted(batch)}); expected 'data' and {label_key!r}"
                )
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / name}: 'data' has shape {data.shape}; expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _load_cifar(root: str | Path, spec: dict, val_fraction: float, seed: int) -> DatasetSplits:
    check_fraction("val_fraction", val_fraction)
    folder = _find_folder(root, spec)
    meta = _unpickle(folder / spec["meta"])
    if spec["names"] not in meta:
        raise ValueError(f"{folder / spec['meta']} has no {spec['names']!r} entry (keys: {sorted(meta)})")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names"]]]
    train_images, train_labels = _read_batches(folder, spec["train"], spec["labels"])
    test_images, test_labels = _read_batches(folder, spec["test"], spec["labels"])
    val_idx, train_idx = stratified_split(train_labels, [val_fraction], seed)
    train = RawDataset(train_images, train_labels, load=array_to_image)
    return DatasetSplits(
        train=train.select(train_idx),
        val=train.select(val_idx),
        test=RawDataset(test_images, test_labels, load=array_to_image),
        class_names=class_names,
        modality="image",
    )


def load_cifar10(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """CIFAR-10: 10 classes (``airplane ... truck``, the order of ``batches.meta``); 50,000 train / 10,000 test.

    ``val`` = a stratified ``val_fraction`` of the 50,000 training images (5,000 by default), ``train`` the rest.
    """
    return _load_cifar(root, CIFAR10, val_fraction, seed)


def load_cifar100(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """CIFAR-100 with its 100 fine labels (order of ``meta``'s ``fine_label_names``); 50,000 train / 10,000 test.

    ``val`` = a stratified ``val_fraction`` of the training images, ``train`` the rest.
    """
    return _load_cifar(root, CIFAR100, val_fraction, seed)
