"""data=tfds: any TensorFlow Datasets image classification dataset, read straight from its prepared records.

The image and label features come from the builder's info (its supervised keys, else its first Image and
ClassLabel features), the class names from the label feature. An image's id is `<TFDS split>/<index>`: its
position in that split's records, which TFDS reads in a fixed order (shuffle_files=False). The dataset's own
validation and test splits are used when it has them; what it lacks is split off its train split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import tensorflow as tf

from finetune import quiet
from finetune.config import UsageError
from finetune.dataset import ImageFolder
from finetune.decode_check import (
    CACHE_FORMAT,
    cache_file_for,
    decodable,
    file_stats,
    read_json,
    stats_version,
    unusable_reason,
    write_json_atomically,
)
from finetune.sources import download_failure, network_errors

ROLES = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}  # TFDS split names per split


@dataclass(frozen=True)
class TfdsSource:
    """A prepared TFDS dataset's records; reads each split's images in record order."""

    name: str
    data_dir: str
    image_key: str
    label_key: str
    version: str
    in_record_order: ClassVar[bool] = True

    @property
    def location(self) -> str:
        return f"tfds:{self.name}/{self.version} in {self.data_dir}"

    def info(self) -> dict[str, str]:
        return {"root": self.location, "tfds": self.name, "tfds_dir": self.data_dir}

    def records(self, tfds_split: str) -> tf.data.Dataset:
        """(index, example) of a TFDS split's records in their fixed order, images left encoded."""
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.name, data_dir=self.data_dir)
        examples = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                      decoders={self.image_key: tfds.decode.SkipDecoding()})
        return examples.enumerate()

    def encoded(self, ids: list[str], labels: list[int]) -> tf.data.Dataset:
        """(encoded image, label) of these images (ids in record order), streamed from the records."""
        wanted: dict[str, list[int]] = {}
        for image_id in ids:
            tfds_split, index = image_id.rsplit("/", 1)
            wanted.setdefault(tfds_split, []).append(int(index))
        parts = [self.select(tfds_split, indices) for tfds_split, indices in wanted.items()]
        if not parts:
            return tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string), tf.constant([], tf.int64)))
        selected = parts[0]
        for part in parts[1:]:
            selected = selected.concatenate(part)
        return selected.apply(tf.data.experimental.assert_cardinality(len(ids)))  # a filter's count is unknown

    def select(self, tfds_split: str, indices: list[int]) -> tf.data.Dataset:
        """(encoded image, label) of the records at these indices of a TFDS split, in record order."""
        keep = tf.lookup.StaticHashTable(  # index -> 1 (int64: the table kernels have no bool values for int64 keys)
            tf.lookup.KeyValueTensorInitializer(tf.constant(indices, tf.int64), tf.ones(len(indices), tf.int64)),
            default_value=0,
        )
        chosen = self.records(tfds_split).filter(lambda index, example: keep.lookup(index) == 1)
        return chosen.map(lambda index, example: (example[self.image_key], tf.cast(example[self.label_key], tf.int64)))

    def record_name(self, image_id: str) -> str:
        return image_id

    def image_id(self, record_name: str) -> str:
        return record_name


def scan_tfds(name: str, data_dir: str | Path, cache_dir: str | Path | None = None) -> ImageFolder:
    """Prepare (download once) a TFDS dataset and decode-check every image of the splits a run uses.

    With cache_dir, the result is kept there with the sizes and times of the dataset's record files, and
    reused while they are unchanged.
    """
    builder = prepared_builder(name, str(Path(data_dir).expanduser()))
    image_key, label_key = image_features(name, builder.info.features, builder.info.supervised_keys)
    source = TfdsSource(name, str(Path(data_dir).expanduser()), image_key, label_key, str(builder.info.version))
    cache_file = cache_file_for(source.location, Path(cache_dir).expanduser() if cache_dir else None)
    records_version = _records_version(Path(builder.data_dir))
    cached = read_json(cache_file)
    if records_version and cached.get("format") == CACHE_FORMAT and cached.get("records") == records_version:
        scanned = cached["folder"]
        return ImageFolder(source, scanned["class_names"], scanned["paths"], scanned["labels"],
                           [tuple(entry) for entry in scanned["skipped"]], scanned["given"])
    folder = ImageFolder(source, list(builder.info.features[label_key].names), [], [])
    for role, tfds_split in split_roles(name, list(builder.info.splits)).items():
        first = len(folder.paths)
        _scan_split(source, tfds_split, folder)
        if role != "train":
            folder.given[role] = list(range(first, len(folder.paths)))
    if cache_file is not None and records_version:
        scanned = {key: getattr(folder, key) for key in ("class_names", "paths", "labels", "skipped", "given")}
        write_json_atomically(cache_file, {"format": CACHE_FORMAT, "records": records_version, "folder": scanned})
    return folder


def _records_version(prepared_dir: Path) -> str:
    """A hash of the paths, sizes and times of a prepared dataset's files ("" when it has none, e.g. mock data)."""
    files = sorted(str(path) for path in prepared_dir.glob("*") if path.is_file()) if prepared_dir.is_dir() else []
    return stats_version(file_stats(files)) if files else ""


def _scan_split(source: TfdsSource, tfds_split: str, folder: ImageFolder) -> None:
    """Add a TFDS split's usable images (in record order) and its skipped ones, with the reason, to folder."""
    records = source.records(tfds_split)
    total = int(records.cardinality())
    if total < 0:  # unknown: count them
        total = int(records.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    examples = records.map(lambda index, example: (index, example[source.image_key],
                                                   tf.cast(example[source.label_key], tf.int64)))
    with quiet.native_output_hidden():  # libjpeg's line for every image it refuses: the skipped list says it once
        usable = dict(decodable(examples, total, f"Checking {source.name} {tfds_split}"))
        failed = [index for index in range(total) if index not in usable]
        if failed:
            for index, (contents, _) in zip(failed, source.select(tfds_split, failed).as_numpy_iterator()):
                folder.skipped.append((f"{tfds_split}/{index}", unusable_reason(contents) or "cannot be decoded"))
    for index in sorted(usable):
        folder.paths.append(f"{tfds_split}/{index}")
        folder.labels.append(usable[index])


def prepared_builder(name: str, data_dir: str) -> Any:
    """The TFDS builder of a dataset, prepared in data_dir (downloaded and prepared there on first use)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(f"data.dataset={name} is not a TensorFlow Datasets dataset; see tfds.list_builders()") from None
    try:
        builder.download_and_prepare()
    except network_errors() as error:
        raise download_failure(name, error, "offline, set data.tfds_dir to a folder where it is already prepared") from error
    return builder


def image_features(name: str, features: Any, supervised_keys: Any) -> tuple[str, str]:
    """(image key, label key): the supervised keys when they are an image and a class label, else the first of each."""
    import tensorflow_datasets as tfds

    def keys_of(kind: type) -> list[str]:
        return [key for key, feature in features.items() if isinstance(feature, kind)]

    images, labels = keys_of(tfds.features.Image), keys_of(tfds.features.ClassLabel)
    if supervised_keys and len(supervised_keys) == 2 and supervised_keys[0] in images and supervised_keys[1] in labels:
        return supervised_keys[0], supervised_keys[1]
    if not images or not labels:
        raise UsageError(f"data.dataset={name} is not an image classification dataset (features: "
                         f"{', '.join(features.keys())}); it needs an Image and a ClassLabel feature")
    return images[0], labels[0]


def split_roles(name: str, tfds_splits: list[str]) -> dict[str, str]:
    """Which TFDS split each of train, val and test comes from; a role it has no split for is left out."""
    roles = {role: next((split for split in names if split in tfds_splits), None) for role, names in ROLES.items()}
    if roles["train"] is None:
        raise UsageError(f"data.dataset={name} has no train split (splits: {', '.join(tfds_splits)})")
    return {role: split for role, split in roles.items() if split is not None}
