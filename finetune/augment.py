"""Training augmentation: random flip, rotation and zoom in one resampling, then MixUp; applied in tf.data.

Keras's RandomFlip, RandomRotation and RandomZoom draw the same transforms, but stacked they pass over a batch
three times and interpolate it twice (4.6 ms of CPU a 224 px image on 2 cores, `benchmarks/augment_cost.py`).
All three are affine maps about the image centre, so their product is one map and one bilinear resampling
(`keras.ops.image.affine_transform`, as the Keras layers use): same draws, one pass, 2.2 ms.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

Augmenter = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]  # (images, labels) batch in and out
AUGMENTATIONS = ("geometric", "mixup")


def augmentation_seeds(seed: int) -> dict[str, int]:
    """One seed per augmentation stage, each a child of the run seed (NumPy's SeedSequence spawning).

    Keras layers given the same integer seed draw the same random numbers, so one shared seed would draw the
    MixUp weights in lockstep with the geometry. Seeds stay non-negative int32, which every Keras backend takes.
    """
    children = np.random.SeedSequence(seed).spawn(len(AUGMENTATIONS))
    return {name: int(child.generate_state(1)[0]) & 0x7FFFFFFF for name, child in zip(AUGMENTATIONS, children)}


class FlipTurnZoom:
    """Per image: a horizontal flip with probability 1/2 (if `flip`), a turn by up to `rotation` of a full turn
    either way, a zoom by a factor in [1 - zoom, 1 + zoom] (Keras's RandomZoom((-zoom, zoom)): above 1 shows
    more of the image); edges filled by reflection, as the Keras layers are configured here."""

    def __init__(self, flip: bool, rotation: float, zoom: float, seed: int) -> None:
        self.flip, self.rotation, self.zoom = flip, rotation, zoom
        self.seeds = keras.random.SeedGenerator(seed)

    def draw(self, batch: tf.Tensor) -> dict[str, tf.Tensor]:
        """One flip (+1 or -1 on x), angle (radians) and zoom factor per image, each drawn independently."""
        def uniform(low: float, high: float) -> tf.Tensor:
            return keras.random.uniform((batch,), low, high, seed=self.seeds)

        mirror = tf.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if self.flip else tf.ones((batch,))
        turn = self.rotation * 2 * math.pi
        return {"mirror": mirror, "angle": uniform(-turn, turn) if self.rotation else tf.zeros((batch,)),
                "zoom": uniform(1.0 - self.zoom, 1.0 + self.zoom) if self.zoom else tf.ones((batch,))}

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        return keras.ops.image.affine_transform(images, sampling_maps(self.draw(shape[0]), shape[1], shape[2]),
                                                interpolation="bilinear", fill_mode="reflect")


def sampling_maps(draws: dict[str, tf.Tensor], height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """Per image, the 8 numbers `affine_transform` takes: where each output pixel samples the input.

    The Keras stack zooms the turned, flipped image, so an output point p samples the input at F(R(Z(p))); each
    map is centre + A (p - centre), so the product is centre + L (p - centre) with L = A_flip A_turn A_zoom.
    """
    cos, sin, zoom, mirror = tf.cos(draws["angle"]), tf.sin(draws["angle"]), draws["zoom"], draws["mirror"]
    a0, a1 = mirror * cos * zoom, -mirror * sin * zoom
    b0, b1 = sin * zoom, cos * zoom
    cx, cy = (tf.cast(width, tf.float32) - 1) / 2, (tf.cast(height, tf.float32) - 1) / 2
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], axis=1)


def make_augmenter(augment_cfg: Any, seed: int) -> Augmenter | None:
    """Random flip/rotation/zoom, then MixUp of images and labels; applied in tf.data, never exported."""
    seeds = augmentation_seeds(seed)
    geometric = None
    if augment_cfg.flip or augment_cfg.rotation or augment_cfg.zoom:
        geometric = FlipTurnZoom(bool(augment_cfg.flip), augment_cfg.rotation, augment_cfg.zoom, seeds["geometric"])
    mixup = keras.layers.MixUp(alpha=augment_cfg.mixup, seed=seeds["mixup"]) if augment_cfg.mixup else None
    if geometric is None and mixup is None:
        return None

    def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if geometric is not None:
            images = geometric(images)
        if mixup is not None:
            mixed = mixup({"images": images, "labels": labels}, training=True)
            images, labels = mixed["images"], mixed["labels"]
        return images, labels

    return augment
