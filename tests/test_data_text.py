"""Text datasets from files: GLUE SST-2, the user's CSV/TSV files, and Hugging Face ``datasets`` when installed."""

import sys
import types

import pytest

from lora_ensemble.app.data import load_dataset


def write_sst2(root, n_train=40, n_dev=6):
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    train = ["sentence\tlabel"] + [f'a "quoted" review number {i}\t{i % 2}' for i in range(n_train)]
    (folder / "train.tsv").write_text("\n".join(train) + "\n")
    dev = ["sentence\tlabel"] + [f"dev sentence {i}\t{i % 2}" for i in range(n_dev)]
    (folder / "dev.tsv").write_text("\n".join(dev) + "\n")
    (folder / "test.tsv").write_text("index\tsentence\n0\tunlabelled\n")
    return folder


def test_sst2_dev_is_test_and_val_is_carved_from_train(tmp_path):
    write_sst2(tmp_path)
    splits = load_dataset("sst2", root=tmp_path, val_fraction=0.25)
    assert splits.class_names == ["negative", "positive"] and splits.modality == "text"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 6)
    assert splits.class_counts("val") == [5, 5]
    assert splits.test[1] == ("dev sentence 1", 1)
    text, _ = splits.train[0]
    assert '"quoted"' in text  # GLUE TSVs have no quoting: quotes are part of the sentence
    assert not set(splits.train.sources) & set(splits.val.sources)


def test_sst2_accepts_the_sst2_folder_and_is_seeded(tmp_path):
    folder = write_sst2(tmp_path)
    a, b = load_dataset("sst2", root=folder, seed=5), load_dataset("sst2", root=tmp_path, seed=5)
    c = load_dataset("sst2", root=tmp_path, seed=6)
    assert a.val.sources == b.val.sources and a.val.sources != c.val.sources


def test_sst2_errors_name_file_and_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.tsv.*sentence<TAB>label"):
        load_dataset("sst2", root=tmp_path)
    folder = write_sst2(tmp_path)
    (folder / "dev.tsv").write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(ValueError, match=r"dev.tsv lacks column\(s\) \['sentence'\]"):
        load_dataset("sst2", root=tmp_path)
    (folder / "dev.tsv").write_text("sentence\tlabel\nhello\tpositive\n")
    with pytest.raises(ValueError, match="'positive'.*not 0/1"):
        load_dataset("sst2", root=tmp_path)


def test_csv_with_string_labels_maps_them_to_sorted_class_names(tmp_path):
    rows = ["review,stars"] + [f'"text, with comma {i}",{["good", "bad", "meh"][i % 3]}' for i in range(30)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = load_dataset(
        "csv", path_or_paths=tmp_path / "data.csv", text_column="review", label_column="stars",
        val_fraction=0.2, test_fraction=0.2,
    )
    assert splits.class_names == ["bad", "good", "meh"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    text, label = splits.test[0]
    assert text.startswith("text, with comma")
    assert splits.class_names[label] == ["good", "bad", "meh"][int(text.split()[-1]) % 3]


def test_csv_train_and_test_files_with_integer_labels(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"t{i}\t{i % 3}\n" for i in range(12)))
    (tmp_path / "test.tsv").write_text("text\tlabel\nx\t2\ny\t0\n")
    paths = [tmp_path / "train.tsv", tmp_path / "test.tsv"]
    splits = load_dataset("csv", path_or_paths=paths, val_fraction=0.25, class_names=["neg", "neu", "pos"])
    assert splits.class_names == ["neg", "neu", "pos"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 2)
    assert splits.test[0] == ("x", 2)
    default_names = load_dataset("csv", path_or_paths={"train": paths[0], "test": paths[1]})
    assert default_names.class_names == ["0", "1", "2"]


def test_csv_errors_name_the_column_and_accepted_inputs(tmp_path):
    (tmp_path / "a.csv").write_text("body,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\].*header: \['body', 'label'\]"):
        load_dataset("csv", path_or_paths=tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="missing.*b.csv"):
        load_dataset("csv", path_or_paths=tmp_path / "b.csv")
    with pytest.raises(ValueError, match="expected 'train' and optionally 'val', 'test'"):
        load_dataset("csv", path_or_paths={"training": tmp_path / "a.csv"})
    (tmp_path / "c.csv").write_text("text,label\nhello,spam\nbye,ham\n")
    with pytest.raises(ValueError, match=r"\['spam'\] are not in class_names"):
        load_dataset("csv", path_or_paths=tmp_path / "c.csv", class_names=["ham", "eggs"])
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        load_dataset("csv", path_or_paths=tmp_path / "c.csv", val_fraction=1.5)


def test_hf_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_dataset("hf", name_or_path="glue", config="sst2", text_column="sentence")


class FakeSplit:
    """The few parts of ``datasets.Dataset`` the loader uses: column_names, features, column and row access."""

    def __init__(self, columns, features=None):
        self.columns, self.features = columns, features or {}
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return list(self.columns[key])
        return {name: values[key] for name, values in self.columns.items()}


def _fake_datasets(monkeypatch, loaded=None, error=None):
    module = types.ModuleType("datasets")

    def load_dataset(path, name=None, cache_dir=None):
        if error is not None:
            raise error
        return loaded

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_dataset_uses_class_label_names_and_ignores_unlabelled_test(monkeypatch):
    label = types.SimpleNamespace(names=["negative", "positive"])
    sentences, labels = [f"s{i}" for i in range(20)], [i % 2 for i in range(20)]
    train = FakeSplit({"sentence": sentences, "label": labels}, {"label": label})
    validation = FakeSplit({"sentence": ["v0", "v1"], "label": [0, 1]}, {"label": label})
    test = FakeSplit({"sentence": ["t0", "t1"], "label": [-1, -1]}, {"label": label})
    _fake_datasets(monkeypatch, {"train": train, "validation": validation, "test": test})
    splits = load_dataset("hf", name_or_path="glue", config="sst2", text_column="sentence", test_fraction=0.2)
    assert splits.class_names == ["negative", "positive"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 2, 4)
    assert splits.val[1] == ("v1", 1)
    # the unlabelled test split is ignored: test is carved out of train, every sample keeping its own label
    assert sorted([text for text, _ in splits.train] + [text for text, _ in splits.test]) == sorted(sentences)
    assert [label for _, label in splits.test] == [int(text[1:]) % 2 for text, _ in splits.test]


def test_hf_dataset_errors_name_the_columns_and_offline_cache(monkeypatch):
    _fake_datasets(monkeypatch, {"train": FakeSplit({"text": ["a", "b"], "label": ["x", "y"]})})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence'\]; its columns are \['text', 'label'\]"):
        load_dataset("hf", name_or_path="some/set", text_column="sentence")
    _fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach the Hub"))
    with pytest.raises(FileNotFoundError, match="HF_DATASETS_OFFLINE=1"):
        load_dataset("hf", name_or_path="some/set")


def test_hf_image_dataset_decodes_images_on_access(monkeypatch):
    from PIL import Image

    images = [Image.new("L", (3, 2), i) for i in range(10)]
    train = FakeSplit({"img": images, "label": ["cat", "dog"] * 5})
    _fake_datasets(monkeypatch, {"train": train, "test": FakeSplit({"img": images[:2], "label": ["dog", "cat"]})})
    splits = load_dataset("hf", name_or_path="pets", image_column="img", val_fraction=0.2)
    assert splits.modality == "image" and splits.class_names == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    image, label = splits.test[0]
    assert image.mode == "RGB" and label == 1
