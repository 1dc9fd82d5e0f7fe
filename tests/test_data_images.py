"""Image datasets: a user points a loader at the folder they downloaded and gets PIL images with labels."""

import pickle

import numpy as np
import pytest
from PIL import Image

from lora_ensemble.app.data import load_dataset

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _pickle(path, obj):
    with open(path, "wb") as file:
        pickle.dump(obj, file)


def _cifar_batch(n, labels_key, num_classes, offset):
    """A batch like the official ones: bytes keys, data (n, 3072) uint8, labels a list of ints."""
    data = (np.arange(n * 3072).reshape(n, 3072) + offset) % 256
    return {b"batch_label": b"test", labels_key: [i % num_classes for i in range(n)], b"data": data.astype(np.uint8)}


def write_cifar10(root, per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", _cifar_batch(per_batch, b"labels", 10, i))
    _pickle(folder / "test_batch", _cifar_batch(per_batch, b"labels", 10, 0))
    _pickle(folder / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return folder


def write_cifar100(root, n=200):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        batch = _cifar_batch(n, b"fine_labels", 100, 7)
        batch[b"coarse_labels"] = [i % 20 for i in range(n)]
        _pickle(folder / name, batch)
    _pickle(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return folder


def test_cifar10_from_the_python_batches(tmp_path):
    write_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=tmp_path, val_fraction=0.2, seed=0)
    assert splits.class_names[:2] == ["airplane", "automobile"] and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)
    assert splits.class_counts("val") == [2] * 10  # stratified
    image, label = splits.test[3]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 3
    # the first pixel's red, green, blue are bytes 0, 1024, 2048 of the row (channel-first layout)
    row = (np.arange(3 * 3072, 4 * 3072)) % 256
    assert image.getpixel((0, 0)) == (row[0], row[1024], row[2048])


def test_cifar10_accepts_the_folder_itself_and_the_split_is_seeded(tmp_path):
    folder = write_cifar10(tmp_path)
    a = load_dataset("cifar10", root=folder, seed=1)
    b = load_dataset("cifar10", root=tmp_path, seed=1)
    c = load_dataset("cifar10", root=tmp_path, seed=2)
    assert np.array_equal(a.val.sources, b.val.sources)
    assert not np.array_equal(a.val.sources, c.val.sources)
    assert len(a.val) + len(a.train) == 100


def test_cifar100_uses_the_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    splits = load_dataset("cifar100", root=tmp_path, val_fraction=0.5)
    assert splits.num_classes == 100 and splits.class_names[99] == "class99"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 100, 200)
    assert splits.test[150][1] == 50


def test_cifar_errors_name_the_missing_file_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/.*data_batch_1.*batches.meta"):
        load_dataset("cifar10", root=tmp_path)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    _pickle(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="no 'labels' entry"):
        load_dataset("cifar10", root=tmp_path)


HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def write_ham10000(root, lesions_per_class=6, images_per_lesion=(1, 2, 3)):
    """Metadata CSV + tiny JPEGs spread over the two official part folders; some lesions have several images."""
    rows, n = ["lesion_id,image_id,dx,dx_type,age,sex,localization"], 0
    for k, dx in enumerate(HAM_CLASSES):
        for j in range(lesions_per_class):
            for _ in range(images_per_lesion[j % len(images_per_lesion)]):
                part = root / f"HAM10000_images_part_{1 + n % 2}"
                part.mkdir(parents=True, exist_ok=True)
                image_id = f"ISIC_{n:07d}"
                Image.new("RGB", (8, 6), (k * 30, j * 20, 5)).save(part / f"{image_id}.jpg")
                rows.append(f"HAM_{k:02d}{j:03d},{image_id},{dx},histo,50.0,male,back")
                n += 1
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return n


def test_ham10000_never_splits_a_lesion(tmp_path):
    total = write_ham10000(tmp_path, lesions_per_class=10)
    splits = load_dataset("ham10000", root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert splits.class_names == HAM_CLASSES
    assert len(splits.train) + len(splits.val) + len(splits.test) == total
    lesions = {name: set(getattr(splits, name).lesion_ids) for name in ("train", "val", "test")}
    assert not lesions["train"] & lesions["val"] and not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    assert [len(lesions[name]) for name in ("train", "val", "test")] == [6 * 7, 2 * 7, 2 * 7]  # per class lesions
    image, label = splits.test[0]
    assert image.size == (8, 6) and image.mode == "RGB"
    assert splits.test.ids[0].startswith("ISIC_")
    again = load_dataset("ham10000", root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert again.test.ids == splits.test.ids


def test_ham10000_class_weights_undo_the_imbalance(tmp_path):
    write_ham10000(tmp_path, lesions_per_class=5)
    splits = load_dataset("ham10000", root=tmp_path, val_fraction=0.0, test_fraction=0.0)
    counts = np.asarray(splits.class_counts(), dtype=float)
    weights = splits.class_weights().numpy()
    assert weights.shape == (7,) and abs(weights.mean() - 1) < 1e-6
    assert np.allclose(weights * counts, (weights * counts)[0])  # w_k * n_k is the same for every class


def test_ham10000_accepts_one_flat_image_folder(tmp_path):
    write_ham10000(tmp_path, lesions_per_class=3)
    for part in tmp_path.glob("HAM10000_images_part_*"):
        for image in part.iterdir():
            image.rename(tmp_path / image.name)
        part.rmdir()
    splits = load_dataset("ham10000", root=tmp_path, val_fraction=0.0, test_fraction=0.4)
    assert splits.test[0][0].mode == "RGB"


def test_ham10000_errors_name_the_file_column_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv.*HAM10000_images_part_1"):
        load_dataset("ham10000", root=tmp_path)
    write_ham10000(tmp_path, lesions_per_class=2)
    next(tmp_path.glob("HAM10000_images_part_2/*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="1 image.*not in"):
        load_dataset("ham10000", root=tmp_path)
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion,image_id,dx\nHAM_1,ISIC_0000000,nv\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lesion_id'\]"):
        load_dataset("ham10000", root=tmp_path)
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_0000000,melanoma\n")
    with pytest.raises(ValueError, match="unknown dx value.*melanoma.*akiec"):
        load_dataset("ham10000", root=tmp_path)


def _image_tree(root, classes=("cat", "dog"), n=10, size=(5, 4)):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (k * 100, i, 0)).save(root / name / f"{i}.png")


def test_image_folder_splits_one_pool(tmp_path):
    _image_tree(tmp_path, n=10)
    splits = load_dataset("image_folder", root=tmp_path, val_fraction=0.2, test_fraction=0.3)
    assert splits.class_names == ["cat", "dog"] and splits.modality == "image"
    assert [len(splits.test), len(splits.val), len(splits.train)] == [6, 4, 10]
    all_ids = splits.train.ids + splits.val.ids + splits.test.ids
    assert len(set(all_ids)) == 20
    image, label = splits.val[0]
    assert image.size == (5, 4) and splits.val.ids[0].startswith(splits.class_names[label])


def test_image_folder_with_train_and_test_folders_carves_val_from_train(tmp_path):
    _image_tree(tmp_path / "train", n=10)
    _image_tree(tmp_path / "test", n=3)
    splits = load_dataset("image_folder", root=tmp_path, val_fraction=0.5)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [10, 10, 6]
    assert all(i.startswith("test/") for i in splits.test.ids)


def test_image_folder_errors_explain_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="<root>/<class>/<image files>"):
        load_dataset("image_folder", root=tmp_path / "nowhere")
    (tmp_path / "flat.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        load_dataset("image_folder", root=tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        load_dataset("image_folder", root=tmp_path)
    _image_tree(tmp_path / "x" / "train", classes=("cat", "dog"), n=2)
    _image_tree(tmp_path / "x" / "val", classes=("cat", "cow"), n=2)
    with pytest.raises(ValueError, match=r"\['cow'\] that train does not have"):
        load_dataset("image_folder", root=tmp_path / "x")
