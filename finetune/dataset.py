"""Datasets: scan a class-per-folder tree (skipping bad files), split it, and feed it through tf.data."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Protocol

import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from finetune.augment import Augmenter
from finetune.config import UsageError
from finetune.decode_check import IMAGE_EXTENSIONS, cache_file_for, check_files, file_stats, stats_version
from finetune.image_cache import ImageCache

SPLITS = ("train", "val", "test")


class ImageSource(Protocol):
    """Where a dataset's encoded images are read from: files, or a TFDS dataset's records."""

    location: str  # for people and records: the folder, or "tfds:NAME/VERSION in DATA_DIR"
    version: str  # changes whenever an image's bytes may have changed (sizes and times of the files)
    in_record_order: ClassVar[bool]  # encoded() reads in the source's own order: a split keeps its ids in that order

    def encoded(self, ids: list[str], labels: list[int]) -> tf.data.Dataset:
        """(encoded image, label) of these images, in this order."""

    def info(self) -> dict[str, str]:
        """What a run records about its data's source (MLflow params `data.*`, metrics.json): enough to read it again."""

    def record_name(self, image_id: str) -> str:
        """An image as data_splits.csv and the split fingerprint name it (a file: its path under the root)."""

    def image_id(self, record_name: str) -> str:
        """The image a record_name names."""


@dataclass(frozen=True)
class FileSource:
    """Image files under a root folder; an image's id is its path."""

    root: Path
    version: str = ""
    in_record_order: ClassVar[bool] = False

    @property
    def location(self) -> str:
        return str(self.root.resolve())

    def info(self) -> dict[str, str]:
        return {"root": self.location}

    def encoded(self, ids: list[str], labels: list[int]) -> tf.data.Dataset:
        files = tf.data.Dataset.from_tensor_slices((tf.constant(ids, tf.string), tf.constant(labels, tf.int64)))
        return files.map(lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=tf.data.AUTOTUNE)

    def record_name(self, image_id: str) -> str:
        return str(Path(image_id).relative_to(self.root))

    def image_id(self, record_name: str) -> str:
        return str(self.root / record_name)


@dataclass
class ImageFolder:
    """Usable images of a dataset (a class-per-folder tree, or a TFDS dataset), and the skipped ones with the reason.

    `paths` are the images' ids in their source: file paths, or a TFDS source's `split/index`. `given` holds the
    images a source puts in a split itself (a TFDS dataset's own validation and test splits) by index into paths.
    """

    source: ImageSource
    class_names: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    given: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Split:
    """One split's images (ids in their source) and integer labels."""

    paths: list[str]
    labels: list[int]
    source: ImageSource

    def subset(self, indices: list[int]) -> Split:
        return Split([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.source)


def scan_folder(root: str | Path, cache_dir: str | Path | None = None) -> ImageFolder:
    """Find every image under root/<class>/, decode-check each once, and skip (and list) the ones that fail.

    With cache_dir, the results are kept there (by path, size and modification time) for the next scan.
    """
    root = Path(root).expanduser()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UsageError(f"{root} has {len(class_dirs)} class folder(s); at least 2 are needed (one subfolder per class)")
    files = {class_dir: class_files(class_dir) for class_dir in class_dirs}
    stats = file_stats([path for paths in files.values() for path in paths])
    reasons = check_files(stats, cache_file_for(root, Path(cache_dir).expanduser() if cache_dir else None))
    folder = ImageFolder(FileSource(root, stats_version(stats)), [d.name for d in class_dirs], [], [])
    for label, class_dir in enumerate(class_dirs):
        usable = [path for path in files[class_dir] if reasons[path] is None]
        if not usable:
            raise UsageError(f"class folder {class_dir} has no usable image ({', '.join(IMAGE_EXTENSIONS)})")
        folder.paths.extend(usable)
        folder.labels.extend([label] * len(usable))
        folder.skipped.extend((path, reasons[path]) for path in files[class_dir] if reasons[path] is not None)
    return folder


def class_files(folder: Path | str) -> list[str]:
    """Every file under a class folder (subfolders too), hidden files left out, in path order.

    Walked folder by folder with each folder's entries sorted by name: the order of sorting the paths.
    """
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    found = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            found.extend(class_files(entry.path))
        elif not entry.name.startswith(".") and entry.is_file():
            found.append(entry.path)
    return found


def split_folder(folder: ImageFolder, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Deterministic stratified train/val/test split; a split the source gives (folder.given) is kept as it is.

    The test split is test_fraction of the images (the source's own test split when it has one), val is
    val_fraction of all the images out of what remains, train is the rest. Each split's images come in a random
    order (a bounded shuffle buffer mixes classes), or in record order for a source that reads only that way.
    """
    labels = np.array(folder.labels)
    given = {index for indices in folder.given.values() for index in indices}
    rest = np.array([index for index in range(len(folder.paths)) if index not in given], dtype=np.int64)
    chosen = {name: np.array(indices, dtype=np.int64) for name, indices in folder.given.items()}
    try:
        if "test" not in chosen:
            rest, chosen["test"] = train_test_split(rest, test_size=test_fraction, stratify=labels[rest],
                                                    random_state=seed)
        if "val" not in chosen:
            rest, chosen["val"] = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                                   stratify=labels[rest], random_state=seed)
    except ValueError as error:
        counts = ", ".join(f"{n}={c}" for n, c in zip(folder.class_names, np.bincount(labels)))
        raise UsageError(f"too few images to split per class ({counts}): {' '.join(str(error).split())}") from None
    chosen["train"] = rest
    if folder.source.in_record_order:
        chosen = {name: np.sort(indices) for name, indices in chosen.items()}
    return {name: Split([folder.paths[i] for i in chosen[name]], labels[chosen[name]].tolist(), folder.source)
            for name in SPLITS}


def split_fingerprint(splits: dict[str, Split]) -> str:
    """A short hash of which image is in which split, to tell two runs' data apart."""
    digest = hashlib.sha256()
    for name in SPLITS:
        source = splits[name].source
        for record_name in sorted(source.record_name(path) for path in splits[name].paths):
            digest.update(f"{name}:{record_name}\n".encode())
    return digest.hexdigest()[:16]


def load_image(path: tf.Tensor, size: int) -> tf.Tensor:
    """Decode an image file as training does (see decode_image), uint8 size x size x 3."""
    return decode_image(tf.io.read_file(path), size)


def decode_image(contents: tf.Tensor, size: int) -> tf.Tensor:
    """Decode any supported image as RGB (grayscale and RGBA become RGB) and resize to size x size, uint8."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image = tf.image.resize(image, (size, size))
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def load_images(split: Split, size: int) -> np.ndarray:
    """Decode and resize a split's images exactly as training does, as one uint8 array (N, size, size, 3)."""
    if not split.paths:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(list(_decoded(split, size).as_numpy_iterator()))


def _decoded(split: Split, size: int) -> tf.data.Dataset:
    """A split's images, decoded and resized as training does (uint8), in the split's order."""
    images = split.source.encoded(split.paths, split.labels)
    return images.map(lambda contents, _: decode_image(contents, size), num_parallel_calls=tf.data.AUTOTUNE)


@dataclass(frozen=True)
class ImageBatches:
    """A split's images decoded as training decodes them, batch by batch, afresh on every pass: what measures
    every image of a split without holding them all (15,000 test images at 224 px are 2.25 GB)."""

    split: Split
    size: int
    batch_size: int = 64

    def __len__(self) -> int:
        return len(self.split.paths)

    def __iter__(self) -> Iterator[np.ndarray]:
        return _decoded(self.split, self.size).batch(self.batch_size).prefetch(1).as_numpy_iterator()


def read_splits(csv_path: Path, source: ImageSource, class_names: list[str]) -> dict[str, Split]:
    """The splits a run wrote to data_splits.csv."""
    splits = {name: Split([], [], source) for name in SPLITS}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            splits[row["split"]].paths.append(source.image_id(row["path"]))
            splits[row["split"]].labels.append(class_names.index(row["class"]))
    return splits


def make_dataset(
    split: Split,
    num_classes: int,
    size: int,
    batch_size: int,
    augmenter: Augmenter | None = None,
    seed: int = 0,
    cache: ImageCache = ImageCache("memory"),
) -> tf.data.Dataset:
    """(float32 0..255 images, one-hot labels) batches; shuffled and augmented when given an augmenter.

    The decoded, resized images are kept between epochs as `cache` says (memory, a snapshot on disk, or not at all).
    """
    ds = split.source.encoded(split.paths, split.labels)
    ds = ds.map(lambda contents, y: (decode_image(contents, size), tf.one_hot(y, num_classes)),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = cache.keep(ds, _cache_key(split, size))
    if augmenter is not None:
        ds = ds.shuffle(cache.shuffle_buffer(len(split.paths), size), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        ds = ds.map(augmenter, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _cache_key(split: Split, size: int) -> str:
    """Which decoded images a cache holds: the source and its version, the images in order, the size."""
    digest = hashlib.sha256(f"{split.source.location}\n{split.source.version}\n{size}\n".encode())
    for path in split.paths:
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()[:16]
