"""Deterministic, stratified index splits shared by the loaders that carve val/test out of a bigger split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Sequence

import numpy as np

from lora_ensemble.app.data.base import DatasetSplits, RawDataset


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` if ``0 <= value < 1``, else raise naming the argument."""
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be a fraction in [0, 1)")
    return float(value)


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(N)`` into ``len(fractions) + 1`` disjoint parts with the same class mix.

    For each class ``c`` (in increasing label order) its ``n_c`` indices, in ascending order, are permuted with
    ``numpy.random.default_rng(seed)``; part ``j`` takes the next ``round(n_c * fractions[j])`` of them and the
    last part takes the rest. Each returned index array is sorted ascending.

    Args:
        labels: ``(N,)`` integer labels.
        fractions: fraction of every class for each part but the last; must sum to < 1.
        seed: the same seed and labels always give the same split.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if sum(fractions) >= 1.0:
        raise ValueError(f"split fractions {list(fractions)} sum to >= 1; nothing would be left for training")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for j, fraction in enumerate(fractions):
            stop = start + int(round(len(members) * fraction))
            parts[j].append(members[start:stop])
            start = stop
        parts[-1].append(members[start:])
    return [np.sort(np.concatenate(part)) if part else np.zeros(0, np.int64) for part in parts]


def grouped_stratified_split(
    groups: Sequence[str], labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Like :func:`stratified_split`, but items sharing a group id always land in the same part.

    The unit that is split is the group (e.g. a HAM10000 lesion): the sorted unique group ids are labelled with the
    label of their first item and split by :func:`stratified_split`; fractions therefore count groups, not items.
    Returns item index arrays, sorted ascending.
    """
    groups = np.asarray(groups).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    unique, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_parts = stratified_split(labels[first], fractions, seed)
    part_of_group = np.empty(len(unique), dtype=np.int64)
    for j, members in enumerate(group_parts):
        part_of_group[members] = j
    part_of_item = part_of_group[inverse.reshape(-1)]
    return [np.flatnonzero(part_of_item == j) for j in range(len(group_parts))]


def per_class_text_splits(corpus: dict[str, list[tuple[str, str]]], class_names: list[str], all_classes: list[str],
                          sizes: list[tuple[int, int, int]], ood_class: str | None, n_ood: int, seed: int,
                          seed_offset: int, cut: Callable[[str], str]) -> DatasetSplits:
    """Class-balanced text splits of a corpus `{class: [(id, text), ...]}` with one class held out as OOD.

    Class k of `class_names` (label k) gives `sizes[k] = (n_test, n_val, n_train)` items, in that order, from its
    items permuted with `default_rng([seed, seed_offset + all_classes.index(name)])`; the OOD split is the first
    `n_ood` items of `ood_class` permuted the same way. Each split is then interleaved with
    `default_rng([seed, seed_offset + 100 + j])`, j = 0 (ood), 1 (train), 2 (val), 3 (test). `cut` shortens a text.
    The caller checks the sizes (with its own messages); the same arguments always give the same splits.
    """
    parts: dict[str, tuple[list, list, list]] = {split: ([], [], []) for split in ("train", "val", "test")}
    for k, name in enumerate(class_names):
        items = corpus[name]
        order = np.random.default_rng([seed, seed_offset + all_classes.index(name)]).permutation(len(items))
        stops = np.cumsum(sizes[k])
        for split, (start, stop) in zip(("test", "val", "train"), ((0, stops[0]), (stops[0], stops[1]),
                                                                   (stops[1], stops[2]))):
            ids, texts, labels = parts[split]
            for i in order[start:stop]:
                ids.append(items[i][0])
                texts.append(cut(items[i][1]))
                labels.append(k)

    def dataset(ids: list, texts: list, labels: list, j: int) -> RawDataset:
        mixed = np.random.default_rng([seed, seed_offset + 100 + j]).permutation(len(labels))  # interleave classes
        return RawDataset([texts[i] for i in mixed], [labels[i] for i in mixed], ids=[ids[i] for i in mixed])

    ood = None
    if ood_class is not None:
        items = corpus[ood_class]
        order = np.random.default_rng([seed, seed_offset + all_classes.index(ood_class)]).permutation(len(items))
        order = order[:n_ood]
        ood = dataset([items[i][0] for i in order], [cut(items[i][1]) for i in order], [-1] * n_ood, 0)
    return DatasetSplits(train=dataset(*parts["train"], 1), val=dataset(*parts["val"], 2),
                         test=dataset(*parts["test"], 3), class_names=class_names, modality="text", ood=ood)
