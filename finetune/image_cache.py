"""Where a run keeps its decoded, resized images between epochs: `data.cache` = auto, memory, disk or none.

`auto` keeps them in memory while they fit `memory_budget_gb` and otherwise writes a tf.data snapshot into
`data.cache_dir` (read back by later epochs and later runs on the same images at the same size). Either way
a run's memory stays within the budget, however many images there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

SHUFFLE_BUFFER_BYTES = 256 * 2**20  # decoded images a shuffle buffer may hold when they are not in memory anyway


def decoded_bytes(images: int, size: int) -> int:
    """What `images` decoded uint8 images of size x size x 3 take."""
    return images * size * size * 3


@dataclass(frozen=True)
class ImageCache:
    """memory, disk (a tf.data snapshot under directory) or none."""

    mode: str
    directory: Path | None = None

    def keep(self, images: tf.data.Dataset, key: str) -> tf.data.Dataset:
        """The dataset with its elements kept after the first pass; key names the images (and their size)."""
        if self.mode == "memory":
            return images.cache()
        if self.mode == "disk":
            return images.snapshot(str(self.directory / "decoded" / key))
        return images

    def shuffle_buffer(self, images: int, size: int) -> int:
        """Elements a shuffle may hold: all of them in memory (the cache holds them anyway), else a bounded share."""
        if self.mode == "memory":
            return images
        return max(1, min(images, SHUFFLE_BUFFER_BYTES // decoded_bytes(1, size)))


def choose(mode: str, cache_dir: str | Path, budget_gb: float, images: int, size: int) -> ImageCache:
    """The cache data.cache asks for; `auto`: memory when every split's decoded images fit the budget, else disk."""
    if mode == "auto":
        mode = "memory" if decoded_bytes(images, size) <= budget_gb * 1e9 else "disk"
    return ImageCache(mode, Path(cache_dir).expanduser() if mode == "disk" else None)
