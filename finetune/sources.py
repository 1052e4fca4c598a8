"""Where a dataset's class folders are: a local path, or tf_flowers from TensorFlow Datasets."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.config import UsageError

COMPLETE_MARKER = ".complete"


def data_root(data_cfg: Any) -> Path:
    """The class-per-folder directory to train on."""
    if data_cfg.path:
        return Path(data_cfg.path).expanduser()
    return tf_flowers_folder(Path(data_cfg.tfds_dir), Path(data_cfg.cache_dir))


def tf_flowers_folder(tfds_dir: Path, cache_dir: Path) -> Path:
    """Download tf_flowers with TFDS (once) and unpack it into cache_dir/flower_photos/<class>/."""
    target = cache_dir / "flower_photos"
    if (target / COMPLETE_MARKER).exists():
        return target
    import tensorflow_datasets as tfds

    builder = tfds.builder("tf_flowers", data_dir=str(tfds_dir))
    try:
        builder.download_and_prepare()
    except Exception as error:  # TFDS wraps network failures in many exception types
        reason = " ".join(str(error).split())[:160]
        raise UsageError(
            f"tf_flowers could not be downloaded ({reason}); offline, pass data.path=/path/to/flower_photos"
        ) from error
    class_names = builder.info.features["label"].names
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    examples = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    for index, example in enumerate(examples.as_numpy_iterator()):
        class_dir = partial / class_names[int(example["label"])]
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{index:05d}.jpg").write_bytes(example["image"])
    (partial / COMPLETE_MARKER).touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
