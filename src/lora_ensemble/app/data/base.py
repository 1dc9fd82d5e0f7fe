"""The common container every loader returns: three labelled splits plus what a trainer needs to know about them.

Items are *raw* inputs, never tensors, so one dataset serves every model: a ``str`` for text, an RGB
``PIL.Image.Image`` for images, a 1-D ``float32`` numpy waveform in ``[-1, 1]`` for audio. Turning a list of
items into model inputs is the job of a collator (:mod:`lora_ensemble.app.data.collators`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

MODALITIES = ("text", "image", "audio")
SPLITS = ("train", "val", "test", "ood")


class RawDataset(Dataset):
    """A labelled list: ``dataset[i] == (load(sources[i]), labels[i])``.

    Args:
        sources: one entry per item: the raw input itself (a ``str``, an image array, ...) or a reference to it
            (a file path) when ``load`` is given.
        labels: ``(N,)`` integer class indices; ``-1`` marks an out-of-distribution item without a class.
        load: called on ``sources[i]`` at access time (e.g. open an image file), so large datasets stay on disk.
            Must be a module-level function so that ``DataLoader(num_workers > 0)`` can pickle it.
        ids: optional ``(N,)`` stable item names (file name, image id) to trace an item back to its source.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        labels: Sequence[int],
        load: Callable[[Any], Any] | None = None,
        ids: Sequence[str] | None = None,
    ):
        if len(sources) != len(labels) or (ids is not None and len(ids) != len(labels)):
            counts = f"{len(sources)} sources, {len(labels)} labels" + ("" if ids is None else f", {len(ids)} ids")
            raise ValueError(f"RawDataset got {counts}; they must have the same length")
        self.sources = sources
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.load = load
        self.ids = None if ids is None else [str(i) for i in ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        source = self.sources[index]
        return (self.load(source) if self.load is not None else source), int(self.labels[index])

    def select(self, indices: Sequence[int]) -> "RawDataset":
        """The items at ``indices`` (in that order), as a new ``RawDataset`` sharing ``load``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(self.sources, np.ndarray):
            sources = self.sources[indices]
        else:
            sources = [self.sources[i] for i in indices]
        ids = None if self.ids is None else [self.ids[i] for i in indices]
        return RawDataset(sources, self.labels[indices], self.load, ids)

    def __repr__(self) -> str:
        return f"RawDataset(n={len(self)})"


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """``(N,)`` labels of ``dataset``: its ``labels`` attribute when it has one, else by reading every item."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64).reshape(-1)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


@dataclass
class DatasetSplits:
    """Train/val/test splits of one classification task, plus an optional out-of-distribution set.

    Attributes:
        train, val, test: datasets whose items are ``(raw_input, label)`` with ``0 <= label < num_classes``.
            ``val`` may be empty (``len == 0``) when the dataset's protocol has no validation split (ESC-50 without
            ``val_fold``, ``val_fraction=0``).
        class_names: ``class_names[k]`` is the name of label ``k``; fixed order, documented by each loader.
        modality: ``"text"``, ``"image"`` or ``"audio"``: the type of ``raw_input`` (``str``, RGB PIL image,
            1-D float32 numpy waveform).
        ood: out-of-distribution test items, or ``None``. Their label is ``-1`` when they belong to no class of
            ``class_names`` (e.g. the held-out BBC class); a loader whose OOD items keep their original class
            says so in its docstring.
        sample_rate: waveform sampling rate in Hz; required for audio, ``None`` otherwise.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    modality: str
    ood: Dataset | None = None
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality={self.modality!r} is not supported; expected one of {MODALITIES}")
        if self.modality == "audio" and not self.sample_rate:
            raise ValueError("modality='audio' needs sample_rate (Hz), got None")
        if len(self.class_names) < 2:
            raise ValueError(f"a classification task needs at least 2 classes, got class_names={self.class_names}")
        self.class_names = [str(name) for name in self.class_names]

    @property
    def num_classes(self) -> int:
        """``C = len(class_names)``."""
        return len(self.class_names)

    def split(self, name: str) -> Dataset:
        """The dataset called ``name`` (``"train"``, ``"val"``, ``"test"`` or ``"ood"``)."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is not a split; expected one of {SPLITS}")
        dataset = getattr(self, name)
        if dataset is None:
            raise ValueError(f"split={name!r} is not available: this DatasetSplits has no out-of-distribution set")
        return dataset

    def class_counts(self, split: str = "train") -> list[int]:
        """``counts[k]`` = number of items of ``split`` with label ``k``, for ``k < C`` (``-1`` labels are skipped)."""
        labels = dataset_labels(self.split(split))
        labels = labels[(labels >= 0) & (labels < self.num_classes)]
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def class_weights(self, split: str = "train") -> torch.Tensor:
        """Inverse-frequency class weights for a weighted cross-entropy, normalized to mean 1.

        ``w_k = (1 / n_k) / mean_j(1 / n_j)`` where ``n_k`` is the count of class ``k`` in ``split``; returns a
        float32 tensor of shape ``(C,)`` to pass as ``torch.nn.CrossEntropyLoss(weight=w)``.
        """
        counts = np.asarray(self.class_counts(split), dtype=np.float64)
        if (counts == 0).any():
            empty = [self.class_names[k] for k in np.flatnonzero(counts == 0)]
            raise ValueError(f"cannot weight classes with no {split} items: {empty}")
        inverse = 1.0 / counts
        return torch.as_tensor(inverse / inverse.mean(), dtype=torch.float32)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(getattr(self, name))}" for name in SPLITS if getattr(self, name) is not None)
        rate = f", sample_rate={self.sample_rate}" if self.sample_rate else ""
        return f"DatasetSplits({self.modality}, {self.num_classes} classes, {sizes}{rate})"
