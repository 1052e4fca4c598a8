"""Training augmentation: the one-resampling flip, turn and zoom against Keras's layers, its draws, MixUp."""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import tensorflow as tf
from omegaconf import OmegaConf

from finetune.augment import make_augmenter, sampling_maps


def smooth_image(count: int, size: int = 64) -> np.ndarray:
    """Slowly varying colours (bilinear interpolation is nearly exact on them), different per channel and image."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    images = [np.stack([127 + 100 * np.sin(x / 7 + i) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
              for i in range(count)]
    return np.stack(images).astype(np.float32)


def test_one_resampling_matches_kerass_flip_then_turn_then_zoom() -> None:
    images = tf.constant(smooth_image(64))
    flip = keras.layers.RandomFlip("horizontal", seed=1)
    turn = keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=2)
    zoom = keras.layers.RandomZoom((-0.1, 0.1), fill_mode="reflect", seed=3)
    drawn = [layer.get_random_transformation(images) for layer in (flip, turn, zoom)]
    stacked = images
    for layer, transformation in zip((flip, turn, zoom), drawn):
        stacked = layer.transform_images(stacked, transformation)
    draws = {"mirror": tf.where(tf.reshape(drawn[0]["flips"], [-1]), -1.0, 1.0),
             "angle": drawn[1]["angle"] * math.pi / 180, "zoom": tf.reshape(drawn[2]["height_zoom"], [-1])}
    assert 0 < float(tf.reduce_mean(draws["mirror"])) ** 2 < 0.5 and float(tf.math.reduce_std(draws["angle"])) > 0.2
    once = keras.ops.image.affine_transform(images, sampling_maps(draws, 64, 64), fill_mode="reflect")
    centre = slice(20, 44)  # no fill reaches this square at up to 36 degrees and zoom 1.1
    np.testing.assert_allclose(once.numpy()[:, centre, centre], stacked.numpy()[:, centre, centre], atol=1.5)
    assert np.abs(once.numpy() - images.numpy()).mean() > 20  # the draws did move the pixels


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
