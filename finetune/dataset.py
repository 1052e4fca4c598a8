"""Datasets: scan a class-per-folder tree (skipping bad files), split it, and feed it through tf.data."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from finetune import interrupts
from finetune.config import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "val", "test")
Augmenter = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]  # (images, labels) batch in and out


@dataclass
class ImageFolder:
    """Usable images of a class-per-folder tree, and the files that were skipped with the reason."""

    root: Path
    class_names: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Split:
    """One split's files and integer labels."""

    paths: list[str]
    labels: list[int]


def scan_folder(root: str | Path) -> ImageFolder:
    """Find every image under root/<class>/, decode each once, and skip (and list) the ones that fail."""
    root = Path(root).expanduser()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UsageError(f"{root} has {len(class_dirs)} class folder(s); at least 2 are needed (one subfolder per class)")
    folder = ImageFolder(root=root, class_names=[d.name for d in class_dirs], paths=[], labels=[])
    for label, class_dir in enumerate(class_dirs):
        usable = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            interrupts.check()
            reason = _unusable_reason(path)
            if reason:
                folder.skipped.append((str(path), reason))
                continue
            folder.paths.append(str(path))
            folder.labels.append(label)
            usable += 1
        if usable == 0:
            raise UsageError(f"class folder {class_dir} has no usable image ({', '.join(IMAGE_EXTENSIONS)})")
    return folder


DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError)


def decode_error_reason(error: tf.errors.OpError) -> str:
    """A decoding failure in one short line, without TensorFlow's op-name prefix."""
    return " ".join(error.message.split("}}")[-1].split())[:120]


def _unusable_reason(path: Path) -> str | None:
    """Why this file cannot be trained on, or None when it decodes as an image."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file type ({path.suffix or 'no extension'})"
    try:
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    except DECODE_ERRORS as error:
        return "cannot be decoded: " + decode_error_reason(error)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "empty image"
    return None


def split_folder(folder: ImageFolder, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Deterministic stratified train/val/test split."""
    paths, labels = np.array(folder.paths), np.array(folder.labels)
    try:
        rest_paths, test_paths, rest_labels, test_labels = train_test_split(
            paths, labels, test_size=test_fraction, stratify=labels, random_state=seed
        )
        train_paths, val_paths, train_labels, val_labels = train_test_split(
            rest_paths,
            rest_labels,
            test_size=val_fraction / (1 - test_fraction),
            stratify=rest_labels,
            random_state=seed,
        )
    except ValueError as error:
        counts = ", ".join(f"{n}={c}" for n, c in zip(folder.class_names, np.bincount(labels)))
        raise UsageError(f"too few images to split per class ({counts}): {' '.join(str(error).split())}") from None
    return {
        "train": Split(train_paths.tolist(), train_labels.tolist()),
        "val": Split(val_paths.tolist(), val_labels.tolist()),
        "test": Split(test_paths.tolist(), test_labels.tolist()),
    }


def split_fingerprint(splits: dict[str, Split], root: Path) -> str:
    """A short hash of which file is in which split, to tell two runs' data apart."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for path in sorted(splits[name].paths):
            digest.update(f"{name}:{Path(path).relative_to(root)}\n".encode())
    return digest.hexdigest()[:16]


def load_image(path: tf.Tensor, size: int) -> tf.Tensor:
    """Decode any supported image as RGB (grayscale and RGBA become RGB) and resize to size x size, uint8."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (size, size))
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def load_images(paths: list[str], size: int) -> np.ndarray:
    """Decode and resize files exactly as training does, as one uint8 array (N, size, size, 3)."""
    ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: load_image(p, size), num_parallel_calls=tf.data.AUTOTUNE)
    return np.stack(list(ds.as_numpy_iterator())) if paths else np.zeros((0, size, size, 3), np.uint8)


def read_splits(csv_path: Path, root: Path, class_names: list[str]) -> dict[str, Split]:
    """The splits a run wrote to data_splits.csv."""
    splits = {name: Split([], []) for name in SPLITS}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            splits[row["split"]].paths.append(str(root / row["path"]))
            splits[row["split"]].labels.append(class_names.index(row["class"]))
    return splits


AUGMENTATIONS = ("flip", "rotation", "zoom", "mixup")


def augmentation_seeds(seed: int) -> dict[str, int]:
    """One seed per augmentation, each a child of the run seed (NumPy's SeedSequence spawning).

    Keras layers given the same integer seed draw the same random numbers, so one shared seed would flip,
    rotate and zoom every image in lockstep. Seeds stay non-negative int32, which every Keras backend takes.
    """
    children = np.random.SeedSequence(seed).spawn(len(AUGMENTATIONS))
    return {name: int(child.generate_state(1)[0]) & 0x7FFFFFFF for name, child in zip(AUGMENTATIONS, children)}


def make_augmenter(augment_cfg: Any, seed: int) -> Augmenter | None:
    """Random flip/rotation/zoom, then MixUp of images and labels; applied in tf.data, never exported."""
    seeds = augmentation_seeds(seed)
    layers = []
    if augment_cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seeds["flip"]))
    if augment_cfg.rotation:
        layers.append(keras.layers.RandomRotation(augment_cfg.rotation, fill_mode="reflect", seed=seeds["rotation"]))
    if augment_cfg.zoom:
        zoom_range = (-augment_cfg.zoom, augment_cfg.zoom)
        layers.append(keras.layers.RandomZoom(zoom_range, fill_mode="reflect", seed=seeds["zoom"]))
    geometric = keras.Sequential(layers, name="augment") if layers else None
    mixup = keras.layers.MixUp(alpha=augment_cfg.mixup, seed=seeds["mixup"]) if augment_cfg.mixup else None
    if geometric is None and mixup is None:
        return None

    def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if geometric is not None:
            images = geometric(images, training=True)
        if mixup is not None:
            mixed = mixup({"images": images, "labels": labels}, training=True)
            images, labels = mixed["images"], mixed["labels"]
        return images, labels

    return augment


def make_dataset(
    split: Split,
    num_classes: int,
    size: int,
    batch_size: int,
    augmenter: Augmenter | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """(float32 0..255 images, one-hot labels) batches; shuffled and augmented when given an augmenter."""
    ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    ds = ds.map(lambda p, y: (load_image(p, size), tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.cache()  # decoded, resized uint8 images stay in memory after the first epoch
    if augmenter is not None:
        ds = ds.shuffle(len(split.paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        ds = ds.map(augmenter, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
