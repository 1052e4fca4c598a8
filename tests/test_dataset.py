"""Scanning class folders (bad files skipped and listed), splitting, and the tf.data pipeline."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from conftest import COLORS, write_image
from finetune.config import UsageError, compose
from finetune.dataset import (
    load_images,
    make_augmenter,
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


MARKER_SIZE, MARKER_OFFSET = 64, 12  # test image side, and each marker's distance from its centre (pixels)
GRID_Y, GRID_X = np.mgrid[0:MARKER_SIZE, 0:MARKER_SIZE] - (MARKER_SIZE - 1) / 2


def marker_image() -> np.ndarray:
    """Black, a red dot right of the centre and a green dot above it: where they land shows flip, turn and zoom."""
    image = np.zeros((MARKER_SIZE, MARKER_SIZE, 3), np.float32)
    for channel, (x, y) in ((0, (MARKER_OFFSET, 0)), (1, (0, -MARKER_OFFSET))):
        image[..., channel] = 255 * np.exp(-((GRID_X - x) ** 2 + (GRID_Y - y) ** 2) / 8)
    return image


def centroids(images: np.ndarray, channel: int) -> np.ndarray:
    """(x, y) of each image's intensity-weighted centre in one channel, relative to the image centre."""
    weights = images[..., channel] / images[..., channel].sum(axis=(1, 2), keepdims=True)
    return np.stack([(weights * GRID_X).sum(axis=(1, 2)), (weights * GRID_Y).sum(axis=(1, 2))], axis=-1)


def measured_draws(augmented_markers: np.ndarray) -> dict[str, np.ndarray]:
    """Per augmented marker image: whether it was flipped, the angle it was turned by, the factor it was scaled by."""
    red, green = centroids(augmented_markers, 0), centroids(augmented_markers, 1)
    flipped = red[:, 0] * green[:, 1] - red[:, 1] * green[:, 0] > 0  # a mirror image swaps the markers' handedness
    unflip = np.where(flipped, -1.0, 1.0)  # the flip alone moves red to (-offset, 0): turn that back to (+offset, 0)
    angle = np.arctan2(red[:, 1] * unflip, red[:, 0] * unflip)
    return {"flip": flipped.astype(float), "rotation": angle, "zoom": np.hypot(red[:, 0], red[:, 1]) / MARKER_OFFSET}


def test_flip_rotation_and_zoom_draw_independently() -> None:
    rotation, zoom, count = 0.05, 0.2, 512
    augment = make_augmenter(OmegaConf.create({"flip": True, "rotation": rotation, "zoom": zoom, "mixup": 0.0}), seed=42)
    markers = tf.constant(np.repeat(marker_image()[None], count, axis=0))
    draws = measured_draws(augment(markers, tf.zeros((count, 1)))[0].numpy())
    # the measurement recovers each transform's draw: about half flipped, angles and scales spread over their ranges
    assert 0.4 < draws["flip"].mean() < 0.6
    assert np.abs(draws["rotation"]).max() < rotation * 2 * np.pi * 1.05 and draws["rotation"].std() > 0.1
    assert 1 / (1 + zoom) * 0.98 < draws["zoom"].min() and draws["zoom"].max() < 1 / (1 - zoom) * 1.02
    for first, second in itertools.combinations(draws, 2):
        # a shared seed made these +-0.85 to 1; for independent draws one standard error is 1/sqrt(512) = 0.044
        correlation = np.corrcoef(draws[first], draws[second])[0, 1]
        assert abs(correlation) < 0.15, f"{first} and {second} draws correlate: {correlation:.2f}"


def test_augmentation_repeats_for_the_same_seed_only() -> None:
    augment_cfg = OmegaConf.create({"flip": True, "rotation": 0.05, "zoom": 0.2, "mixup": 0.4})
    markers, labels = tf.constant(np.repeat(marker_image()[None], 16, axis=0)), tf.one_hot(np.arange(16) % 2, 2)
    first, again, other = (make_augmenter(augment_cfg, seed)(markers, labels)[0].numpy() for seed in (7, 7, 8))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_mixup_blends_images_and_labels_with_the_same_weights() -> None:
    off = {"flip": False, "rotation": 0.0, "zoom": 0.0}
    assert make_augmenter(OmegaConf.create({**off, "mixup": 0.0}), seed=1) is None
    mixup = make_augmenter(OmegaConf.create({**off, "mixup": 1.0}), seed=1)
    labels = tf.one_hot(np.arange(32) % 3, 3)
    images = tf.tile(100.0 * labels[:, None, None, :], (1, 8, 8, 1))  # channel c is 100 exactly for class c
    mixed_images, mixed_labels = (t.numpy() for t in mixup(images, labels))
    # about 2/3 are blends: a third of the random partners share the class, and sharing leaves the label whole
    assert ((mixed_labels > 0.01) & (mixed_labels < 0.99)).any(axis=1).mean() > 0.3
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(mixed_images.mean(axis=(1, 2)), 100.0 * mixed_labels, atol=1e-3)
