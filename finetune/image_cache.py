"""Where a run keeps its decoded, resized images between epochs: `data.cache` = auto, memory, disk or none.

`auto` keeps them in memory while they fit `memory_budget_gb` and otherwise writes a tf.data snapshot into
`data.cache_dir` (read back by later epochs and later runs on the same images at the same size). Either way
a run's memory stays within the budget, however many images there are.

A snapshot lives in `data.cache_dir/decoded/<key>/`, with a marker file the tool writes (and touches at each use).
tf.data never resumes a snapshot whose first pass was cut short: the next run writes a new one beside it (a new
run folder under the graph-hash folder, `snapshot.metadata` then names it) and the cut one stays. So each use
removes the run folders the metadata does not name once nothing has been written to them for
`STALE_WRITE_SECONDS` (a live writer adds to its files with every batch: a concurrent sweep job's is kept); and
before a run writes or reads snapshots, the ones the tool made are pruned, least recently used first, until they
take at most `data.cache_disk_gb`, except those used in the last `IN_USE_SECONDS` (a running job may read them).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import snapshot_pb2

SHUFFLE_BUFFER_BYTES = 256 * 2**20  # decoded images a shuffle buffer may hold when they are not in memory anyway
MARKER = "finetune-decoded-images"  # in every snapshot folder this tool made; its time is the last use
STALE_WRITE_SECONDS = 600  # a snapshot write untouched this long was cut short (a live one writes every batch)
IN_USE_SECONDS = 24 * 3600  # a snapshot used this recently is never pruned: a job may still be reading it
SNAPSHOTS = "decoded"  # the snapshots' folder in data.cache_dir


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
            folder = self.directory / SNAPSHOTS / key
            claim(folder)
            return images.snapshot(str(folder))
        return images

    def prune(self, disk_gb: float) -> list[Path]:
        """On disk: prune the tool's older snapshots to disk_gb (data.cache_disk_gb) before this run uses them."""
        if self.mode != "disk":
            return []
        return prune_snapshots(self.directory / SNAPSHOTS, disk_gb * 1e9)

    def shuffle_buffer(self, images: int, size: int) -> int:
        """Elements a shuffle may hold: all of them in memory (the cache holds them anyway), else a bounded share."""
        if self.mode == "memory":
            return images
        return max(1, min(images, SHUFFLE_BUFFER_BYTES // decoded_bytes(1, size)))


def choose(mode: str, cache_dir: str | Path, budget_gb: float, images: int, size: int) -> ImageCache:
    """The cache data.cache asks for; `auto`: memory when every split's decoded images fit the budget, else disk."""
    if mode == "auto":
        mode = "memory" if decoded_bytes(images, size) <= budget_gb * 1e9 else "disk"
    if mode != "disk":
        return ImageCache(mode)
    return ImageCache(mode, Path(cache_dir).expanduser())


def claim(folder: Path) -> None:
    """Mark folder as one of this tool's snapshots, used now, and remove what cut-short writes left in it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    for graph_folder in (path for path in folder.iterdir() if path.is_dir()):
        current = current_run(graph_folder)
        for run_folder in (path for path in graph_folder.iterdir() if path.is_dir() and path.name != current):
            if time.time() - last_written(run_folder) > STALE_WRITE_SECONDS:
                shutil.rmtree(run_folder, ignore_errors=True)


def current_run(graph_folder: Path) -> str | None:
    """The run folder a finished snapshot's metadata names (None while no write has finished)."""
    record = snapshot_pb2.SnapshotMetadataRecord()
    try:
        record.ParseFromString((graph_folder / "snapshot.metadata").read_bytes())
    except (OSError, ValueError):
        return None
    return record.run_id if record.finalized else None


def last_written(folder: Path) -> float:
    """The newest modification time of folder and everything in it."""
    return max([folder.stat().st_mtime, *(path.stat().st_mtime for path in folder.rglob("*"))])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def prune_snapshots(snapshots: Path, budget_bytes: float) -> list[Path]:
    """Remove the snapshots this tool made (those with its marker), least recently used first, until the rest take
    at most budget_bytes; those used in the last IN_USE_SECONDS stay whatever they take. Returns the removed ones."""
    if not snapshots.is_dir():
        return []
    last_used = {path: (path / MARKER).stat().st_mtime for path in snapshots.iterdir() if (path / MARKER).is_file()}
    sizes = {path: folder_bytes(path) for path in last_used}
    total, removed = sum(sizes.values()), []
    for folder in sorted(last_used, key=last_used.get):
        if total <= budget_bytes or time.time() - last_used[folder] < IN_USE_SECONDS:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        removed.append(folder)
    return removed
