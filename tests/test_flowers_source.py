"""data=flowers: tf_flowers through TensorFlow Datasets, unpacked once into class folders."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from finetune.dataset import scan_folder
from finetune.sources import tf_flowers_folder


def test_tf_flowers_is_unpacked_into_class_folders(tmp_path: Path) -> None:
    with tfds.testing.mock_data(num_examples=12):
        root = tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")
    assert root == tmp_path / "cache" / "flower_photos"
    folder = scan_folder(root)
    assert set(folder.class_names) <= {"dandelion", "daisy", "tulips", "sunflowers", "roses"}
    assert len(folder.paths) + len(folder.skipped) == 12
    # a second call reuses the unpacked copy without touching TFDS
    assert tf_flowers_folder(tmp_path / "nowhere", tmp_path / "cache") == root
