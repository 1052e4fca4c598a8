"""Scanning class folders (bad files skipped and listed), splitting, and the tf.data pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from conftest import COLORS, write_image
from finetune.augment import make_augmenter
from finetune.config import UsageError, compose
from finetune.dataset import (
    load_images,
    make_dataset,
    scan_folder,
    split_fingerprint,
    split_folder,
)
from finetune.run import prepare_data


def test_scan_skips_and_lists_unusable_files(tiny_images: Path) -> None:
    folder = scan_folder(tiny_images)
    assert folder.class_names == ["class_0", "class_1", "class_2"]
    assert len(folder.paths) == 3 * 14
    skipped = {Path(path).name: reason for path, reason in folder.skipped}
    assert set(skipped) == {"corrupt.jpg", "notes.txt"}
    assert "cannot be decoded" in skipped["corrupt.jpg"]
    assert "not an image file type" in skipped["notes.txt"]


def test_every_format_decodes_to_rgb(tiny_images: Path) -> None:
    folder = scan_folder(tiny_images)
    split = split_folder(folder, 0.2, 0.2, seed=0)["train"]
    images, labels = next(iter(make_dataset(split, 3, 40, batch_size=64)))
    assert images.shape == (len(split.paths), 40, 40, 3)
    assert images.dtype.name == "float32"
    assert 0 <= float(np.min(images)) and float(np.max(images)) <= 255
    assert labels.shape == (len(split.paths), 3)
    # each class keeps its colour whatever the file format (grayscale excepted): mean of the dominant channel
    for image, label in zip(images.numpy(), labels.numpy().argmax(-1)):
        assert image.mean(axis=(0, 1)).argmax() == np.argmax(COLORS[label]) or np.ptp(image.mean(axis=(0, 1))) < 1


def test_split_is_stratified_disjoint_and_deterministic(tiny_images: Path) -> None:
    folder = scan_folder(tiny_images)
    first = split_folder(folder, 0.2, 0.2, seed=3)
    again = split_folder(folder, 0.2, 0.2, seed=3)
    other = split_folder(folder, 0.2, 0.2, seed=4)
    assert first["test"].paths == again["test"].paths
    assert split_fingerprint(first) == split_fingerprint(again)
    assert split_fingerprint(first) != split_fingerprint(other)
    sets = [set(first[name].paths) for name in ("train", "val", "test")]
    assert sum(len(s) for s in sets) == len(folder.paths) == len(set().union(*sets))
    for name in ("val", "test"):
        counts = np.bincount(first[name].labels, minlength=3)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # every class, in equal shares


def test_class_without_usable_images_stops_with_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label in range(2):
        (tmp_path / f"c{label}").mkdir()
    for index in range(4):
        write_image(tmp_path / "c0" / f"{index}.png", COLORS[0], rng)
    (tmp_path / "c1" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UsageError, match="c1 has no usable image"):
        scan_folder(tmp_path)


def test_fewer_than_two_classes_stops(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(UsageError, match="at least 2 are needed"):
        scan_folder(tmp_path)


def test_too_few_images_to_split_is_a_usage_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label in range(2):
        (tmp_path / f"c{label}").mkdir()
        write_image(tmp_path / f"c{label}" / "a.png", COLORS[label], rng)
    with pytest.raises(UsageError, match="too few images"):
        split_folder(scan_folder(tmp_path), 0.15, 0.15, seed=0)


def batches(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every (images, labels) batch of one pass, concatenated."""
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


def test_unaugmented_dataset_is_exactly_the_decoded_images_every_pass(tiny_images: Path) -> None:
    split = split_folder(scan_folder(tiny_images), 0.2, 0.2, seed=0)["val"]
    decoded = load_images(split, 32).astype(np.float32)
    plain = make_dataset(split, 3, 32, batch_size=4)
    for _ in range(2):  # the second pass comes from the cache
        images, labels = batches(plain)
        np.testing.assert_array_equal(images, decoded)
        np.testing.assert_array_equal(labels, np.eye(3)[split.labels])
    augment = make_augmenter(OmegaConf.create({"flip": True, "rotation": 0.2, "zoom": 0.2, "mixup": 0.0}), seed=1)
    augmented, _ = batches(make_dataset(split, 3, 32, batch_size=4, augmenter=augment))
    assert augmented.shape == decoded.shape
    assert not np.allclose(np.sort(augmented.ravel()), np.sort(decoded.ravel()))


def test_a_runs_validation_and_test_batches_are_never_augmented(tiny_images: Path, tmp_path: Path) -> None:
    cfg = compose(["data=folder", f"data.path={tiny_images}", f"data.cache_dir={tmp_path}", "backbone.input_size=32", "data.batch_size=4",
                   "data.augment.mixup=0.4"])  # flip, rotation and zoom are on by default
    data = prepare_data(cfg)
    train, val, test = data.datasets(cfg)
    for name, dataset in (("val", val), ("test", test)):
        for _ in range(2):
            images, labels = batches(dataset)
            np.testing.assert_array_equal(images, load_images(data.splits[name], 32).astype(np.float32))
            np.testing.assert_array_equal(labels, np.eye(3)[data.splits[name].labels])
    # the same config does augment the training split (so the check above is not vacuous)
    train_images, train_labels = batches(train)
    plain_train = load_images(data.splits["train"], 32)
    assert not np.allclose(np.sort(train_images.ravel()), np.sort(plain_train.ravel()))
    assert ((train_labels > 0.01) & (train_labels < 0.99)).any()  # MixUp blended some labels
