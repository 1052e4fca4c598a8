"""The decode check of every image, in parallel (tf.data), remembered per file in `data.cache_dir`.

A file's result is kept with its size and modification time (`scan-<root hash>.json`), so the next scan of
the same folder (a rerun, every job of a sweep) decodes only the files that are new or changed. Images are
checked many at once with the verdict of training's decode (a JPEG at 1/8 scale: see `_decoded_shape`); the
few that fail are decoded again one by one, fully, for the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from finetune import interrupts, quiet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError)
CACHE_FORMAT = f"2, tensorflow {tf.__version__}"  # results of another check (or decoder) are not reused;
# 1 was a check whose decode never ran (see `_decoded_shape`): it kept files cut short
CHECK_GROUP = 32  # images checked in one parallel call
MAX_DECODED_VALUES = 1 << 29  # TensorFlow refuses a JPEG of this many values (height x width x its components)
Stat = tuple[int, int]  # (size in bytes, modification time in ns)


def decode_error_reason(error: tf.errors.OpError) -> str:
    """A decoding failure in one short line, without TensorFlow's op-name prefix."""
    return " ".join(error.message.split("}}")[-1].split())[:120]


def unusable_reason(contents: bytes | tf.Tensor) -> str | None:
    """Why these encoded bytes cannot be trained on, or None when they decode as an image (as training does)."""
    try:
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    except DECODE_ERRORS as error:
        return "cannot be decoded: " + decode_error_reason(error)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "empty image"
    return None


def file_reason(path: Path) -> str | None:
    """Why this file cannot be trained on (its type, or its contents), or None."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file type ({path.suffix or 'no extension'})"
    try:
        return unusable_reason(tf.io.read_file(str(path)))
    except DECODE_ERRORS as error:
        return "cannot be read: " + decode_error_reason(error)


def _decoded_shape(contents: tf.Tensor) -> tf.Tensor:
    """[height, width] of the image when training's full decode accepts it ([0, 0] or an error when it does not).

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling: the inverse transform, upsampling and colour conversion
    shrink; 1.4x less CPU on 1024x768 photos, ~10% on 96-256 px ones, where the Huffman decoding that every
    verdict needs dominates). The verdict is the full decode's: both go through TensorFlow's
    `jpeg::Uncompress` with the same memory source, which fails on a read past the end of the data at any scale
    (no truncated-file recovery) and requires every output line, and libjpeg reads all of the file (markers and
    every coefficient, to the EOI) either way. The one check made on the output size, TensorFlow's limit of 2**29
    values, is made here on the full size from the header. Other formats are decoded fully, as in training.
    The scaled decode must feed the result: tied by a control dependency only, it never runs (Grappler's dependency
    optimizer drops a control dependency on a stateless op, and the unused decode is then pruned), which is why an
    earlier 1/8-scale check passed files cut short.
    """
    def jpeg() -> tf.Tensor:
        scaled = tf.io.decode_jpeg(contents, channels=3, ratio=8)
        header = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)  # [height, width, components]
        accepted = (tf.reduce_prod(header) < MAX_DECODED_VALUES) & (tf.size(scaled) > 0)
        return tf.where(accepted, tf.cast(header[:2], tf.int32), 0)

    def other() -> tf.Tensor:
        return tf.shape(tf.io.decode_image(contents, channels=3, expand_animations=False))[:2]

    return tf.cond(tf.io.is_jpeg(contents), jpeg, other)


def decodable(examples: tf.data.Dataset, total: int, description: str,
              read: Callable[[tf.Tensor], tf.Tensor] | None = None) -> Iterator[tuple[int, int]]:
    """(index, label) of every (index, encoded image, label) element that decodes; the failed ones are left out.

    index is the element's position (0..total-1). read: turns the element's second item into the encoded image
    (e.g. reads a file), in the same parallel call. Images are checked CHECK_GROUP to a tf.data element (~30% less
    CPU a file than one to an element); a group with an image that fails is dropped whole, so the images of a group
    none of which passed are checked again one by one. A progress bar shows on a terminal (stderr).
    """
    retry = np.ones(-(-total // CHECK_GROUP), bool)
    with tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        for index, label in _passing(examples.batch(CHECK_GROUP), read, bar):
            retry[index // CHECK_GROUP] = False
            yield index, label
        failed_groups = tf.constant(retry)
        groups = examples.batch(CHECK_GROUP).enumerate().filter(lambda number, _: tf.gather(failed_groups, number))
        yield from _passing(groups.map(lambda _, group: group).unbatch().batch(1), read, bar)


def _passing(groups: tf.data.Dataset, read: Callable[[tf.Tensor], tf.Tensor] | None,
             bar: tqdm) -> Iterator[tuple[int, int]]:
    """(index, label) of the decodable images of every group in which none fails (decoded in parallel)."""
    def check(indices: tf.Tensor, items: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        shapes = tf.map_fn(lambda item: _decoded_shape(item if read is None else read(item)), items,
                           fn_output_signature=tf.TensorSpec([2], tf.int32))
        return indices, labels, shapes

    checked = groups.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors().prefetch(2)
    for indices, labels, shapes in checked.as_numpy_iterator():
        interrupts.check()
        bar.update(len(indices))
        decoded = (shapes > 0).all(axis=1)
        yield from zip(indices[decoded].tolist(), labels[decoded].tolist())


def file_stats(files: list[str]) -> dict[str, Stat]:
    """(size, modification time) of each file (paths as text: a 100,000-file scan is mostly this bookkeeping)."""
    return {path: (stat.st_size, stat.st_mtime_ns) for path in files for stat in (os.stat(path),)}


def stats_version(stats: dict[str, Stat]) -> str:
    """A short hash of every file's path, size and modification time: changes when any file may have changed."""
    digest = hashlib.sha256()
    for path, (size, mtime_ns) in stats.items():
        digest.update(f"{path}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def check_files(stats: dict[str, Stat], cache_file: Path | None) -> dict[str, str | None]:
    """Each file's reason to skip it (None: usable); unchanged files' results come from cache_file."""
    known = ScanCache.load(cache_file)
    reasons = {path: known.reason(path) for path, stat in stats.items() if known.unchanged(path, stat)}
    fresh = [path for path in stats if path not in reasons]
    reasons.update(_check_fresh(fresh))
    if cache_file is not None and fresh:
        ScanCache({path: [*stat, reasons[path]] for path, stat in stats.items()}).save(cache_file)
    return reasons


def _check_fresh(files: list[str]) -> dict[str, str | None]:
    """Decode-check files: by type first, then the images in parallel, then the reason for each failure."""
    reasons = {path: file_reason(Path(path)) for path in files
               if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS}
    images = [path for path in files if path not in reasons]
    if not images:
        return reasons
    labels = tf.zeros(len(images), tf.int64)
    examples = tf.data.Dataset.from_tensor_slices((tf.range(len(images), dtype=tf.int64), tf.constant(images), labels))
    with quiet.native_output_hidden():  # libjpeg's line for every file it refuses: the skipped list says it once
        passed = {index for index, _ in decodable(examples, len(images), "Checking images", read=tf.io.read_file)}
        for index, path in enumerate(images):
            reasons[path] = None if index in passed else (file_reason(Path(path)) or "cannot be decoded")
    return reasons


class ScanCache:
    """Decode-check results by file: {path: [size, mtime_ns, reason or None]}; written whole (temp file + rename)."""

    def __init__(self, entries: dict[str, list]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, cache_file: Path | None) -> ScanCache:
        """The cache in cache_file; empty when there is none, or it is unreadable or of another check."""
        data = read_json(cache_file)
        return cls(data["files"] if data.get("format") == CACHE_FORMAT else {})

    def unchanged(self, path: str, stat: Stat) -> bool:
        """Whether the cache has a result for path at this size and modification time."""
        entry = self.entries.get(path)
        return entry is not None and entry[0] == stat[0] and entry[1] == stat[1]

    def reason(self, path: str) -> str | None:
        return self.entries[path][2]

    def save(self, cache_file: Path) -> None:
        write_json_atomically(cache_file, {"format": CACHE_FORMAT, "files": self.entries})


def write_json_atomically(path: Path, data: dict) -> None:
    """Replace path at once (a temporary file beside it, then a rename): a reader, another sweep job, sees the
    old file or the new one, and two writers each write a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: Path | None) -> dict:
    """A JSON file's contents; {} when there is none or it cannot be read."""
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cache_file_for(location: Path | str, cache_dir: Path | None) -> Path | None:
    """Where the scan results of a folder (or TFDS dataset) are kept: cache_dir/scan/<hash of where it is>.json."""
    if cache_dir is None:
        return None
    where = str(location.resolve()) if isinstance(location, Path) else location
    return cache_dir / "scan" / f"{hashlib.sha256(where.encode()).hexdigest()[:16]}.json"
