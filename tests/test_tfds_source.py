"""data=tfds: any TFDS image classification dataset, streamed from its records (TFDS's mock data, and TFDS's
real download and preparation of a miniature `beans` served from 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.download.checksums import UrlInfo
from tensorflow_datasets.datasets.beans import beans_dataset_builder

from finetune.config import UsageError, compose
from finetune.dataset import SPLITS, load_images, read_splits, split_fingerprint, split_folder
from finetune.export import calibration_images
from finetune.run import _write_splits, scan_and_split
from finetune.sources import source_of
from finetune.tfds_source import image_features, scan_tfds
from test_flowers_source import serving

BEANS = ("angular_leaf_spot", "bean_rust", "healthy")


def write_metadata(name: str, split_sizes: dict[str, int], data_dir: Path) -> Path:
    """The dataset_info.json TFDS writes when it prepares a dataset, here with these splits (for MockPolicy.USE_FILES)."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    splits = [tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0,
                                  filename_template=tfds.core.ShardedFileTemplate(
                                      data_dir=builder.data_dir, dataset_name=name, split=split, filetype_suffix="tfrecord"))
              for split, size in split_sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    return data_dir


def png_bytes(label: int, index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20 + index % 7, 16), (80 * label, 100, 10 * index % 250)).save(buffer, "PNG")
    return buffer.getvalue()


BROKEN = {"train": {4, 11}, "test": {2}}  # record indices whose image bytes are not an image


def records_with_broken_images(count: int):
    """A mock `_as_dataset`: `count` records per split, label index % 3, valid PNGs except at BROKEN's indices."""
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        name = str(split)
        images = [b"broken bytes" if index in BROKEN.get(name, ()) else png_bytes(index % 3, index)
                  for index in range(count)]
        labels = [index % 3 for index in range(count)]
        records = tf.data.Dataset.from_tensor_slices({"image": images, "label": tf.constant(labels, tf.int64)})
        if decoders and "image" in decoders:
            return records
        return records.map(lambda record: {**record, "image": tf.io.decode_image(record["image"], channels=3)})
    return as_dataset


@pytest.fixture
def mock_beans(tmp_path: Path) -> Iterator[Path]:
    """beans with train/validation/test of 30 records each, 3 of them broken."""
    metadata = write_metadata("beans", {"train": 30, "validation": 30, "test": 30}, tmp_path / "metadata")
    with tfds.testing.mock_data(data_dir=str(metadata), policy=tfds.testing.MockPolicy.USE_FILES,
                                as_dataset_fn=records_with_broken_images(30)):
        yield tmp_path / "tfds"


def test_own_splits_are_kept_and_broken_records_skipped(mock_beans: Path) -> None:
    folder = scan_tfds("beans", mock_beans)
    assert folder.class_names == list(BEANS)
    assert sorted(image_id for image_id, _ in folder.skipped) == ["test/2", "train/11", "train/4"]
    assert all(reason.startswith("cannot be decoded: ") for _, reason in folder.skipped)
    splits = split_folder(folder, 0.15, 0.15, seed=0)
    assert [len(splits[name].paths) for name in SPLITS] == [28, 30, 29]  # the dataset's own, less the broken
    assert splits["val"].paths[:2] == ["validation/0", "validation/1"] and "test/2" not in splits["test"].paths
    for name in SPLITS:  # the records streamed for a split are its images, in its order, with its labels
        streamed = list(splits[name].source.encoded(splits[name].paths, splits[name].labels).as_numpy_iterator())
        expected = [png_bytes(int(i) % 3, int(i)) for i in (path.split("/")[1] for path in splits[name].paths)]
        assert [image for image, _ in streamed] == expected
        assert [int(label) for _, label in streamed] == splits[name].labels
    assert split_fingerprint(splits) == split_fingerprint(split_folder(scan_tfds("beans", mock_beans), 0.3, 0.3, seed=5))


def test_a_dataset_with_only_a_train_split_is_split_stratified_by_the_seed(tmp_path: Path) -> None:
    metadata = write_metadata("tf_flowers", {"train": 60}, tmp_path / "metadata")
    with tfds.testing.mock_data(num_examples=60, data_dir=str(metadata), policy=tfds.testing.MockPolicy.USE_FILES):
        folder = scan_tfds("tf_flowers", tmp_path / "tfds")
        first, again, other = (split_folder(folder, 0.2, 0.2, seed) for seed in (0, 0, 1))
        assert [len(first[name].paths) for name in SPLITS] == [36, 12, 12] and not folder.given
        assert split_fingerprint(first) == split_fingerprint(again) != split_fingerprint(other)
        for name in SPLITS:
            indices = [int(path.split("/")[1]) for path in first[name].paths]
            assert indices == sorted(indices)  # streamed in record order
            streamed = first[name].source.encoded(first[name].paths, first[name].labels)
            assert [int(label) for _, label in streamed.as_numpy_iterator()] == first[name].labels
        assert load_images(first["test"], 24).shape == (12, 24, 24, 3)


def test_every_consumer_reads_a_tfds_dataset(mock_beans: Path, tmp_path: Path) -> None:
    """Training and evaluation pipelines, int8 calibration, the split record and its reading back (re-export)."""
    cfg = compose(["data=tfds", "data.dataset=beans", f"data.tfds_dir={mock_beans}", f"data.cache_dir={tmp_path / 'cache'}",
                   "backbone.input_size=32", "data.batch_size=8", "export.representative_images=5"])
    data = scan_and_split(cfg)
    assert data.info["name"] == "beans" and data.info["tfds"] == "beans" and data.info["test_images"] == 29
    train, val, test = data.datasets(cfg)
    images, labels = next(iter(train))
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8, 3)
    assert int(train.cardinality()) == 4  # 28 images in batches of 8: training counts its steps from this
    assert sum(len(batch) for batch, _ in test) == 29
    assert calibration_images(cfg, data.splits).shape == (5, 32, 32, 3)
    _write_splits(data.splits, data.folder, tmp_path / "data_splits.csv")
    again = read_splits(tmp_path / "data_splits.csv", source_of(data.info), data.folder.class_names)
    assert {name: again[name].paths for name in SPLITS} == {name: data.splits[name].paths for name in SPLITS}
    np.testing.assert_array_equal(load_images(again["test"], 32), load_images(data.splits["test"], 32))


def test_not_a_classification_dataset_or_an_unknown_name_is_one_line(tmp_path: Path) -> None:
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(), "caption": tfds.features.Text()})
    with pytest.raises(UsageError, match=r"^data.dataset=captions is not an image classification dataset \(features: "
                                         r"image, caption\); it needs an Image and a ClassLabel feature$"):
        image_features("captions", features, None)
    with pytest.raises(UsageError, match=r"^data.dataset=no_such_dataset is not a TensorFlow Datasets dataset"):
        scan_tfds("no_such_dataset", tmp_path)


def jpeg_500(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (500, 500), (shade, 120, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_beans_archives(folder: Path) -> dict[str, bytes]:
    """train.zip, validation.zip and test.zip as the beans builder expects them: <split>/<class>/<name>.jpg."""
    archives = {}
    for split, per_class in (("train", 4), ("validation", 2), ("test", 2)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for label, name in enumerate(BEANS):
                for index in range(per_class):
                    archive.writestr(f"{split}/{name}/{index}.jpg", jpeg_500(60 * label + 20 + 5 * index))
        (folder / f"{split}.zip").write_bytes(buffer.getvalue())
        archives[split] = buffer.getvalue()
    return archives


def point_beans_at(base_url: str, archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The beans builder downloads its three archives from base_url, and TFDS checks them against these."""
    infos = {}
    for split, constant in (("train", "_TRAIN_URL"), ("validation", "_VALIDATION_URL"), ("test", "_TEST_URL")):
        url = f"{base_url}/{split}.zip"
        monkeypatch.setattr(beans_dataset_builder, constant, url)
        infos[url] = UrlInfo(size=len(archives[split]), checksum=hashlib.sha256(archives[split]).hexdigest(),
                             filename=f"{split}.zip")
    monkeypatch.setattr(beans_dataset_builder.Builder, "url_infos", infos)


@pytest.fixture
def prepared_beans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A miniature beans downloaded over HTTP from 127.0.0.1 and prepared by TFDS into a data_dir."""
    served = tmp_path / "served"
    served.mkdir()
    archives = write_beans_archives(served)
    tfds_dir = tmp_path / "tfds"
    with serving(served) as base_url:
        point_beans_at(base_url, archives, monkeypatch)
        folder = scan_tfds("beans", tfds_dir)
    assert len(folder.paths) == 3 * (4 + 2 + 2) and not folder.skipped
    return tfds_dir


def test_tfds_downloads_prepares_and_streams_a_dataset(prepared_beans: Path, tmp_path: Path) -> None:
    # the server is gone: the prepared data_dir is read offline, straight from its records
    folder = scan_tfds("beans", prepared_beans)
    splits = split_folder(folder, 0.15, 0.15, seed=0)
    assert [len(splits[name].paths) for name in SPLITS] == [12, 6, 6]
    assert sorted(folder.class_names[label] for label in splits["test"].labels) == sorted(BEANS * 2)
    records = list((prepared_beans / "beans").rglob("*.tfrecord*"))
    assert records and not list(prepared_beans.rglob("*.jpg"))  # records, never unpacked into image files
    test_images = load_images(splits["test"], 16)
    assert test_images.shape == (6, 16, 16, 3)
    assert [int(image[0, 0, 0]) // 60 for image in test_images] == splits["test"].labels  # each its class's shade


def test_offline_without_a_prepared_dataset_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorflow_datasets.core.download import downloader

    with serving(tmp_path) as base_url:
        pass  # stopped: connections are refused
    point_beans_at(base_url, {split: b"" for split in ("train", "validation", "test")}, monkeypatch)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    with pytest.raises(UsageError, match=r"^beans could not be downloaded \(ConnectionRefusedError: .*\); offline, set "
                                         r"data.tfds_dir to a folder where it is already prepared$"):
        scan_tfds("beans", tmp_path / "tfds")


def test_a_second_scan_of_unchanged_records_comes_from_the_cache(prepared_beans: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune import tfds_source

    first = scan_tfds("beans", prepared_beans, tmp_path / "cache")
    scanned: list[str] = []
    original = tfds_source._scan_split
    monkeypatch.setattr(tfds_source, "_scan_split", lambda source, split, folder: (scanned.append(split),
                                                                                   original(source, split, folder)))
    again = scan_tfds("beans", prepared_beans, tmp_path / "cache")
    assert scanned == [] and again == first
    record = next((prepared_beans / "beans").rglob("beans-test.tfrecord*"))
    os.utime(record, ns=(1, 1))  # a record file changed: everything is checked again
    assert scan_tfds("beans", prepared_beans, tmp_path / "cache") == first and scanned == ["train", "validation", "test"]
