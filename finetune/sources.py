"""Where a dataset's images are: a local class-per-folder path, tf_flowers unpacked from TFDS, or a TFDS dataset."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path
from typing import Any

from finetune.config import UsageError

COMPLETE_MARKER = ".complete"


def scan_data(data_cfg: Any) -> Any:
    """Scan the configured data (data=tfds: a TFDS dataset's records; otherwise a class-per-folder tree): an ImageFolder."""
    if "dataset" in data_cfg:
        from finetune.tfds_source import scan_tfds

        return scan_tfds(data_cfg.dataset, data_cfg.tfds_dir, data_cfg.cache_dir)
    from finetune.dataset import scan_folder

    return scan_folder(data_root(data_cfg), data_cfg.cache_dir)


def source_of(info: dict[str, Any]) -> Any:
    """The image source a run recorded in its dataset info (metrics.json `dataset`), to read its splits again."""
    if info.get("tfds"):
        from finetune.tfds_source import TfdsSource, image_features, prepared_builder

        builder = prepared_builder(info["tfds"], info["tfds_dir"])
        keys = image_features(info["tfds"], builder.info.features, builder.info.supervised_keys)
        return TfdsSource(info["tfds"], info["tfds_dir"], *keys, str(builder.info.version))
    from finetune.dataset import FileSource

    return FileSource(Path(info["root"]))


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


def download_failure(name: str, error: BaseException, offline_hint: str) -> UsageError:
    """A TFDS download that failed for want of a network, as one line: the root cause and what to do offline."""
    cause = root_cause(error)
    reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:160]
    return UsageError(f"{name} could not be downloaded ({reason}); {offline_hint}")


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
        raise download_failure("tf_flowers", error, "offline, pass data.path=/path/to/flower_photos") from error
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
