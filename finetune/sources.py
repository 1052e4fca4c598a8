"""Where a dataset's class folders are: a local path, or tf_flowers from TensorFlow Datasets."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path
from typing import Any

from finetune.config import UsageError

COMPLETE_MARKER = ".complete"


def data_root(data_cfg: Any) -> Path:
    """The class-per-folder directory to train on."""
    if data_cfg.path:
        return Path(data_cfg.path).expanduser()
    return tf_flowers_folder(Path(data_cfg.tfds_dir), Path(data_cfg.cache_dir))


def network_errors() -> tuple[type[Exception], ...]:
    """What TFDS's downloader raises when the network fails; anything else it raises is a bug, not an outage.

    http(s) goes through requests (refused or broken connections, DNS, proxies, SSL, timeouts, retries
    exhausted on 5xx), ftp through urllib; TFDS raises its own DownloadError for any other HTTP status.
    """
    import requests
    import tensorflow_datasets as tfds

    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
        urllib.error.URLError,
        tfds.download.DownloadError,
    )


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (requests wraps a refused connection three levels deep)."""
    while (cause := error.__cause__ or error.__context__) is not None:
        error = cause
    return error


def tf_flowers_folder(tfds_dir: Path, cache_dir: Path) -> Path:
    """Download tf_flowers with TFDS (once) and unpack it into cache_dir/flower_photos/<class>/."""
    target = cache_dir / "flower_photos"
    if (target / COMPLETE_MARKER).exists():
        return target
    import tensorflow_datasets as tfds

    builder = tfds.builder("tf_flowers", data_dir=str(tfds_dir))
    try:
        builder.download_and_prepare()
    except network_errors() as error:
        cause = root_cause(error)
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:160]
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
