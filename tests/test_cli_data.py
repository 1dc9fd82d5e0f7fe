"""A label only the val/test data has, from a user's Hugging Face dataset: refused by name, or OOD data on request
(the CSV loader's cases run through the command line in test_cli_errors.py and test_cli_runs.py)."""

from __future__ import annotations

import pytest
from test_data_text import FakeSplit, _fake_datasets

from lora_ensemble.app.data import load_dataset


def test_hf_test_label_without_training_rows_is_refused_or_becomes_ood(monkeypatch):
    train = FakeSplit({"text": [f"t{i}" for i in range(8)], "label": ["cat", "dog"] * 4})
    test = FakeSplit({"text": ["a", "b", "c"], "label": ["dog", "bird", "cat"]})
    _fake_datasets(monkeypatch, {"train": train, "test": test})
    with pytest.raises(ValueError, match=r"label\(s\) \['bird'\] of split 'test' of 'pets' \(1 test row\(s\)\)"):
        load_dataset("hf", name_or_path="pets", val_fraction=0.0)
    splits = load_dataset("hf", name_or_path="pets", val_fraction=0.0, unseen_test_labels="ood")
    assert splits.class_names == ["cat", "dog"]
    assert list(splits.test) == [("a", 1), ("c", 0)]
    assert list(splits.ood) == [("b", -1)]


def test_hf_image_rows_of_an_unseen_label_decode_as_ood_images(monkeypatch):
    from PIL import Image

    images = [Image.new("L", (3, 2), i) for i in range(6)]
    train = FakeSplit({"img": images[:4], "label": ["cat", "dog"] * 2})
    test = FakeSplit({"img": images[4:], "label": ["cat", "bird"]})
    _fake_datasets(monkeypatch, {"train": train, "test": test})
    splits = load_dataset("hf", name_or_path="pets", image_column="img", val_fraction=0.0, unseen_test_labels="ood")
    (image, label), = list(splits.ood)
    assert label == -1 and image.mode == "RGB" and image.getpixel((0, 0)) == (5, 5, 5)
    assert [label for _, label in splits.test] == [0]
