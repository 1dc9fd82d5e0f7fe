"""Collators: a list of raw ``(input, label)`` items -> one batch dict of tensors for ``model(**batch)``.

Each collator is model-agnostic: the caller passes the tokenizer / image transform / feature extractor that
matches its backbone. Every batch holds ``labels: (B,)`` int64 next to the model's keyword arguments. Use as
``DataLoader(splits.train, batch_size=B, collate_fn=TextCollator(tokenizer))``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

Item = tuple[Any, int]


def _labels(batch: Sequence[Item]) -> torch.Tensor:
    return torch.as_tensor([int(label) for _, label in batch], dtype=torch.long)


def _as_tensor_dict(features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {key: torch.as_tensor(value) for key, value in features.items()}


class TextCollator:
    """Tokenize a batch of strings -> ``input_ids, attention_mask: (B, L)`` (+ ``token_type_ids`` if the
    tokenizer makes them) and ``labels: (B,)``; ``L`` = longest item, at most ``max_length`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (anything called as ``tokenizer(texts, padding=True, truncation=True,
            max_length=..., return_tensors="pt")``).
        max_length: texts are truncated to this many tokens, special tokens included.
    """

    def __init__(self, tokenizer: Callable, max_length: int = 256):
        if int(max_length) < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive number of tokens")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, batch: Sequence[Item]) -> dict[str, torch.Tensor]:
        texts = [text for text, _ in batch]
        if not all(isinstance(text, str) for text in texts):
            kinds = sorted({type(text).__name__ for text in texts})
            raise TypeError(f"TextCollator expects str inputs, got {kinds}; is this a text dataset?")
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {**_as_tensor_dict(encoded), "labels": _labels(batch)}


def _to_float_tensor(image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32 in ``[0, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCollator:
    """Transform and stack a batch of PIL images -> ``pixel_values: (B, 3, H, W)`` (or ``input_name``) and
    ``labels: (B,)``.

    Args:
        transform: called on one PIL image, returns a ``(3, H, W)`` tensor, e.g. a torchvision
            ``transforms.Compose([Resize(224), ToTensor(), Normalize(...)])`` or timm's
            ``create_transform(**resolve_data_config({}, model=m))``. A Hugging Face image processor also works:
            a returned mapping's ``pixel_values`` of shape ``(1, 3, H, W)`` is unwrapped. ``None`` converts the
            image as is to float ``[0, 1]`` (only for datasets whose images share one size, e.g. CIFAR).
    """

    def __init__(self, transform: Callable | None = None, input_name: str = "pixel_values"):
        self.transform = transform
        self.input_name = input_name  # the model's keyword for the image batch ("x" for timm / torchvision)

    def _one(self, image) -> torch.Tensor:
        if self.transform is None:
            return _to_float_tensor(image)
        out = self.transform(image)
        if isinstance(out, Mapping):
            if "pixel_values" not in out:
                raise ValueError(f"transform returned a mapping with keys {sorted(out)}; expected 'pixel_values'")
            out = torch.as_tensor(np.asarray(out["pixel_values"]))
            out = out[0] if out.ndim == 4 else out
        return torch.as_tensor(out)

    def __call__(self, batch: Sequence[Item]) -> dict[str, torch.Tensor]:
        pixels = [self._one(image) for image, _ in batch]
        shapes = sorted({tuple(p.shape) for p in pixels})
        if len(shapes) > 1:
            raise ValueError(
                f"images in one batch have different shapes {shapes}; pass a transform that resizes/crops them "
                "to one size, e.g. torchvision.transforms.Compose([Resize(224), CenterCrop(224), ToTensor()])"
            )
        return {self.input_name: torch.stack(pixels).float(), "labels": _labels(batch)}


class AudioCollator:
    """Featurize a batch of 1-D waveforms with a Hugging Face feature extractor -> its outputs + ``labels: (B,)``.

    For ``ASTFeatureExtractor`` the batch is ``input_values: (B, 1024, 128)`` (log-mel frames x mel bins); for a
    Wav2Vec2 extractor pass ``padding=True`` to get ``input_values: (B, T_max)`` and ``attention_mask``.

    Args:
        feature_extractor: called as ``feature_extractor(waveforms, sampling_rate=sample_rate,
            return_tensors="pt", **extractor_kwargs)``.
        sample_rate: rate in Hz of the waveforms (``DatasetSplits.sample_rate``); must equal the extractor's
            ``sampling_rate`` when it has one (load the dataset with ``sample_rate=`` that rate to resample).
        extractor_kwargs: extra keyword arguments forwarded to every call (``padding=True``, ``max_length=...``).
    """

    def __init__(self, feature_extractor: Callable, sample_rate: int, **extractor_kwargs: Any):
        expected = getattr(feature_extractor, "sampling_rate", None)
        if expected is not None and int(expected) != int(sample_rate):
            raise ValueError(
                f"the feature extractor expects {expected} Hz audio but sample_rate={sample_rate}; load the dataset "
                f"with sample_rate={expected} (e.g. load_dataset('esc50', root=..., sample_rate={expected}))"
            )
        self.feature_extractor = feature_extractor
        self.sample_rate = int(sample_rate)
        self.extractor_kwargs = extractor_kwargs

    def __call__(self, batch: Sequence[Item]) -> dict[str, torch.Tensor]:
        waveforms = [np.asarray(wave, dtype=np.float32) for wave, _ in batch]
        if any(wave.ndim != 1 for wave in waveforms):
            shapes = sorted({wave.shape for wave in waveforms})
            raise ValueError(f"AudioCollator expects 1-D mono waveforms of shape (T,), got shapes {shapes}")
        features = self.feature_extractor(
            waveforms, sampling_rate=self.sample_rate, return_tensors="pt", **self.extractor_kwargs
        )
        return {**_as_tensor_dict(features), "labels": _labels(batch)}
