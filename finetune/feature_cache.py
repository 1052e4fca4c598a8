"""train.feature_cache=true: the frozen part of the backbone runs once per augmented view, not once per epoch.

Phase 1 fits the head on the pooled backbone features of `train.feature_views` augmented views of each
training image (the validation images once, unaugmented); phase 2 fits the top blocks and the head on the
activations that enter the lowest unfrozen block. One pass over the views fills both caches. The models
fitted are built from the classifier's own layers, so training them trains the classifier: nothing is
copied back, and the trainer (checkpoints, resume, MLflow) is the same for both paths. An epoch is one
pass over the N training images, each drawing one of its views. BatchNorm runs in inference mode
throughout, as in the uncached path.

Caches are .npy files in a folder of the run, each written whole or not at all (a rerun after kill -9
reuses what is there), read into memory while every cache of the process fits in what `memory_budget_gb` leaves
beside the decoded images held in memory
(else memory-mapped from disk), and kept in the process for later trials of a search. A cache's key is
everything upstream of its tensors (backbone settings and weights, input size, split, augmentation and
seed, views, the phase-2 cut), so trials that share all of it share one cache. Files that would not leave
`DISK_HEADROOM_BYTES` free are not written: phase 2 then trains on images, and both phases when even the
pooled features do not fit; the run says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from finetune import interrupts
from finetune.augment import make_augmenter
from finetune.backbones import BACKBONES
from finetune.dataset import Split, make_dataset
from finetune.image_cache import ImageCache
from finetune.model import POOL_LAYER, block_map, model_backbone, top_blocks
from finetune.trainer import Feed, Feeds, ImageFeeds

CACHE_DIR = "feature_cache"  # in the run folder (a search's: shared by its trials)
DISK_HEADROOM_BYTES = 1e9  # left free beside the cache files, for the checkpoints, the export and MLflow
CANNOT_RESERVE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}  # posix_fallocate(3): the filesystem cannot allocate
POOLED, BOUNDARY = "pooled", "boundary"  # the cached tensors: the head's input, the phase-2 top's input
GEOMETRIC = ("flip", "rotation", "zoom")  # the augmentations a view can hold (MixUp trains uncached)


@dataclass
class ClassifierCut:
    """The classifier cut where its caches sit: images -> cached tensors, and the models fitted on them."""

    extractor: keras.Model  # images -> [boundary activations,] pooled features (inference mode)
    head: keras.Model  # pooled features -> probabilities
    top: keras.Model | None  # boundary activations -> probabilities (top of the backbone + head); None: no cut
    boundary: str | None  # the backbone layer whose input is the cut

    @property
    def names(self) -> tuple[str, ...]:
        """The extractor's outputs, in order."""
        return (POOLED,) if self.top is None else (BOUNDARY, POOLED)


def phase2_cut(backbone: keras.Model, spec: Any, unfreeze_blocks: int) -> keras.layers.Layer | None:
    """The layer at whose input phase 2's cache sits: the first layer of the lowest unfrozen block, or else the
    nearest layer below it whose input is the one tensor crossing there; None when no layer qualifies."""
    lowest = top_blocks(backbone, spec, unfreeze_blocks)[0]
    start = backbone.layers.index(block_map(backbone, spec)[lowest][0])
    return next((layer for layer in reversed(backbone.layers[1:start + 1]) if _backbone_above(backbone, layer)),
                None)


def _backbone_above(backbone: keras.Model, layer: keras.layers.Layer) -> keras.Model | None:
    """The backbone from `layer`'s input up, when that input is the only tensor crossing below `layer`."""
    if isinstance(layer.input, (list, tuple)):
        return None
    try:  # Keras refuses a model whose output needs a tensor it is not given ("not connected to inputs")
        return keras.Model(layer.input, backbone.output, name="backbone_top")
    except ValueError:
        return None


def cut_classifier(model: keras.Model, cut: keras.layers.Layer | None) -> ClassifierCut:
    """Models sharing the classifier's layers: the extractor of the cached tensors, and what sits above them."""
    backbone = model_backbone(model)
    pool = model.get_layer(POOL_LAYER)
    head = keras.Model(pool.output, model.output, name="head")
    pooling = keras.Model(pool.input, pool.output, name="pooling")  # calls of `pool` itself would add nodes to it
    images = keras.Input(model.input.shape[1:], name="image")
    x = images
    for layer in model.layers[1:model.layers.index(backbone)]:  # preprocessing (e.g. the [-1, 1] rescaling)
        x = layer(x)
    if cut is None:
        return ClassifierCut(keras.Model(images, [pooling(backbone(x, training=False))]), head, None, None)
    above = _backbone_above(backbone, cut)
    bottom = keras.Model(backbone.input, cut.input, name="backbone_bottom")
    boundary = bottom(x, training=False)
    extractor = keras.Model(images, [boundary, pooling(above(boundary, training=False))], name="extractor")
    activations = keras.Input(boundary.shape[1:], name="boundary")
    top = keras.Model(activations, head(pooling(above(activations, training=False))), name="top_and_head")
    return ClassifierCut(extractor, head, top, cut.name)


@dataclass
class CachedTensors:
    """The cached tensors by name: per training view one array (N, ...), and one array for validation."""

    train: dict[str, list[np.ndarray]]
    val: dict[str, np.ndarray]

    def arrays(self) -> list[np.ndarray]:
        return [a for views in self.train.values() for a in views] + list(self.val.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory (memory-mapped arrays live on disk)."""
        return sum(a.nbytes for a in self.arrays() if not isinstance(a, np.memmap))

    @property
    def storage(self) -> str:
        """Where the arrays are read from: "memory" or "disk"."""
        return "disk" if any(isinstance(a, np.memmap) for a in self.arrays()) else "memory"


_IN_PROCESS: OrderedDict[str, CachedTensors] = OrderedDict()  # key -> tensors, least recently used first


def _remember(key: str, tensors: CachedTensors, budget_bytes: float) -> None:
    """Keep a cache for later trials, dropping the least recently used ones beyond the memory budget."""
    _IN_PROCESS[key] = tensors
    _IN_PROCESS.move_to_end(key)
    while len(_IN_PROCESS) > 1 and sum(t.memory_bytes for t in _IN_PROCESS.values()) > budget_bytes:
        _IN_PROCESS.popitem(last=False)


def cache_key(cfg: DictConfig, backbone: keras.Model, fingerprint: str, views: int, boundary: str | None) -> str:
    """A digest of everything upstream of the cached tensors.

    The backbone's weights enter by value (what the tensors were computed from), so random weights of two
    builds never share a cache, and one weights file under two names does.
    """
    weights = hashlib.sha256()
    for variable in backbone.weights:
        weights.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    backbone_cfg = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items() if k != "unfreeze_blocks"}
    upstream = {
        "backbone": backbone_cfg, "weights": weights.hexdigest(), "pooling": cfg.head.pooling, "split": fingerprint,
        "augment": OmegaConf.to_container(cfg.data.augment, resolve=True), "batch_size": cfg.data.batch_size,
        "seed": cfg.seed, "views": views, "boundary": boundary,
    }
    return hashlib.sha256(json.dumps(upstream, sort_keys=True, default=str).encode()).hexdigest()[:16]


def view_seed(seed: int, view: int) -> int:
    """The augmentation seed of one view: a child of the run seed, so a view written again after a kill is
    still a view of its own (not the first view's draws). Parallel augmentation makes it differ from the lost one."""
    return int(np.random.SeedSequence([seed, view]).generate_state(1)[0]) & 0x7FFFFFFF


class CachedFeeds:
    """Feeds of both phases from cached tensors; phase 2 falls back to images when the backbone has no cut."""

    def __init__(self, model: keras.Model, cfg: DictConfig, images: ImageFeeds, splits: dict[str, Split],
                 num_classes: int, fingerprint: str, folder: Path, decoded: ImageCache, budget_bytes: float) -> None:
        self.cfg, self.images, self.splits, self.num_classes = cfg, images, splits, num_classes
        self.decoded, self.budget_bytes = decoded, budget_bytes
        self.steps_per_epoch = images.steps_per_epoch
        self.augmented = any(cfg.data.augment[name] for name in GEOMETRIC)
        self.views = cfg.train.feature_views if self.augmented else 1  # unaugmented views would all be alike
        backbone = model_backbone(model)
        phase2 = cfg.backbone.unfreeze_blocks > 0 and cfg.train.phase2.epochs > 0
        cut = phase2_cut(backbone, BACKBONES[cfg.backbone.name], cfg.backbone.unfreeze_blocks) if phase2 else None
        self.phase2_on_images = None if cut else "no single tensor enters the unfrozen blocks"
        self.cut = cut_classifier(model, cut)
        self.record: dict[str, Any] = {"feature_cache_views": self.views}
        self._keyed(cache_key(cfg, backbone, fingerprint, self.views, self.cut.boundary), folder)
        if cut is not None and not self.fits_on_disk():
            self.phase2_on_images = (f"the cache files with phase 2's activations ({self.bytes_to_write() / 1e9:.2f} GB) "
                                     f"would leave less than {DISK_HEADROOM_BYTES / 1e9:g} GB free in {folder}")
            self.record["feature_cache_boundary"] = "none (disk)"
            self.cut = cut_classifier(model, None)
            self._keyed(cache_key(cfg, backbone, fingerprint, self.views, None), folder)
        self._tensors: CachedTensors | None = None

    def _keyed(self, key: str, folder: Path) -> None:
        self.key, self.folder = key, folder / key
        self.record["feature_cache_key"] = key

    def bytes_to_write(self) -> int:
        """What the cache files not yet written will take (nothing when this process holds the cache)."""
        if self.key in _IN_PROCESS:
            return 0
        views = [None, *range(self.views)]
        counts = {view: len(self.splits["val" if view is None else "train"].labels) for view in views}
        shapes = dict(zip(self.cut.names, (output.shape[1:] for output in self.cut.extractor.outputs)))
        return sum(4 * counts[view] * int(np.prod(shapes[name])) for view in counts
                   for name, path in self._paths(view).items() if not path.exists())

    def fits_on_disk(self) -> bool:
        """Whether the files still to write leave DISK_HEADROOM_BYTES free where they go."""
        existing = next(path for path in (self.folder, *self.folder.parents) if path.exists())
        return self.bytes_to_write() + DISK_HEADROOM_BYTES <= shutil.disk_usage(existing).free

    def phase1(self) -> Feed:
        tensors = self.tensors()
        return Feed(self.cut.head, self._batches(tensors.train[POOLED], "train"),
                    self._batches([tensors.val[POOLED]], "val"))

    def phase2(self) -> Feed:
        if self.cut.top is None:
            print(f"Feature cache: {self.phase2_on_images}; phase 2 trains on images.", flush=True)
            return self.images.phase2()
        tensors = self.tensors()
        return Feed(self.cut.top, self._batches(tensors.train[BOUNDARY], "train"),
                    self._batches([tensors.val[BOUNDARY]], "val"))

    def tensors(self) -> CachedTensors:
        """The cached tensors: from this process, else from the cache folder, computing the views not there."""
        if self._tensors is None:
            started = time.perf_counter()
            self._tensors, reused = self._find_or_fill()
            _remember(self.key, self._tensors, self.budget_bytes)
            self._report(reused, time.perf_counter() - started)
        return self._tensors

    def _find_or_fill(self) -> tuple[CachedTensors, str]:
        """The tensors, and what was reused: "in process", "from files", "no", or how many views of the files."""
        if self.key in _IN_PROCESS:
            return _IN_PROCESS[self.key], "in process"
        written = self._views_written()
        self._fill()
        return self._load(), {0: "no", self.views: "from files"}.get(written, f"{written} of {self.views} views")

    def _paths(self, view: int | None) -> dict[str, Path]:
        """The files of one training view (or of the validation images, view None), by tensor name."""
        split = "val" if view is None else f"train_view{view}"
        return {name: self.folder / f"{split}_{name}.npy" for name in self.cut.names}

    def _views_written(self) -> int:
        return sum(all(p.exists() for p in self._paths(view).values()) for view in range(self.views))

    def _fill(self) -> None:
        """Compute and write the files that are not there yet, one view at a time."""
        self.folder.mkdir(parents=True, exist_ok=True)
        size, batch = self.cfg.backbone.input_size, self.cfg.data.batch_size
        train = make_dataset(self.splits["train"], self.num_classes, size, batch, cache=self.decoded)  # in order
        jobs = [(None, make_dataset(self.splits["val"], self.num_classes, size, batch, cache=self.decoded))]
        for view in range(self.views):
            augment = make_augmenter(self.cfg.data.augment, view_seed(self.cfg.seed, view))
            jobs.append((view, train if augment is None else train.map(augment, num_parallel_calls=tf.data.AUTOTUNE)))
        for view, batches in jobs:
            paths = self._paths(view)
            if not all(p.exists() for p in paths.values()):
                count = len(self.splits["val" if view is None else "train"].labels)
                _write_outputs(self.cut.extractor, untuned(batches), count, paths)

    def _load(self) -> CachedTensors:
        """The files, in memory when they fit in the memory budget beside the process's other caches."""
        sizes = [p.stat().st_size for view in [None, *range(self.views)] for p in self._paths(view).values()]
        others = sum(t.memory_bytes for key, t in _IN_PROCESS.items() if key != self.key)
        in_memory = sum(sizes) <= self.budget_bytes - others
        read = (lambda path: np.load(path)) if in_memory else (lambda path: np.load(path, mmap_mode="r"))
        return CachedTensors(
            train={name: [read(self._paths(view)[name]) for view in range(self.views)] for name in self.cut.names},
            val={name: read(path) for name, path in self._paths(None).items()},
        )

    def _batches(self, arrays: list[np.ndarray], split: str) -> tf.data.Dataset:
        labels = keras.utils.to_categorical(self.splits[split].labels, self.num_classes).astype("float32")
        shuffle = split == "train" and self.augmented  # as the image pipeline: shuffled when augmented
        return cached_batches(arrays, labels, self.cfg.data.batch_size, self.cfg.seed if shuffle else None)

    def _report(self, reused: str, seconds: float) -> None:
        storage = self._tensors.storage
        budget = f"{self.budget_bytes / 1e9:.2f} GB of memory_budget_gb={self.cfg.memory_budget_gb}"
        self.record.update(feature_cache_storage=storage,
                           feature_cache_mb=round(sum(a.nbytes for a in self._tensors.arrays()) / 1e6, 1))
        where = (f"in memory (within {budget})" if storage == "memory" else
                 f"read from disk ({self.folder}): more than {budget} with the process's other caches")
        cut = f"phase 2 from the input of {self.cut.boundary}" if self.cut.boundary else "no phase-2 cache"
        print(f"Feature cache: {self.views} view(s) of {len(self.splits['train'].labels)} training images and the "
              f"{len(self.splits['val'].labels)} validation images, {cut}; {self.record['feature_cache_mb']} MB "
              f"{where}; reused: {reused}; {seconds:.1f} s", flush=True)
        self.record.update(feature_cache_reused=reused, feature_cache_seconds=seconds)
        self.record.setdefault("feature_cache_boundary", self.cut.boundary or "none")
        mlflow.set_tags({key: str(value) for key, value in self.record.items() if key != "feature_cache_seconds"})


def _write_outputs(extractor: keras.Model, batches: tf.data.Dataset, count: int, paths: dict[str, Path]) -> None:
    """Run the extractor over the batches into .npy files, each renamed into place once whole."""
    partials = {name: path.with_name(path.stem + ".partial.npy") for name, path in paths.items()}
    outputs = dict(zip(paths, extractor.outputs))
    arrays = {name: np.lib.format.open_memmap(partials[name], mode="w+", dtype="float32",
                                              shape=(count, *outputs[name].shape[1:])) for name in paths}
    for partial in partials.values():
        _reserve(partial)
    row = 0
    for images, _ in batches:
        interrupts.check()
        values = extractor.predict_on_batch(images)
        for name, value in zip(paths, values if isinstance(values, list) else [values]):
            arrays[name][row:row + len(value)] = value
        row += len(images)
    for name, array in arrays.items():
        array.flush()
        os.replace(partials[name], paths[name])


def _reserve(path: Path) -> None:
    """Allocate a file's blocks now, so a full disk raises ENOSPC here rather than SIGBUS in a memory-mapped write.

    Where blocks cannot be allocated ahead (a C library without glibc's fallback, such as musl, on a filesystem
    without fallocate: NFS before 4.2, older ZFS), the file is written unreserved, as on macOS and Windows.
    """
    if not hasattr(os, "posix_fallocate"):  # not on macOS or Windows
        return
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno not in CANNOT_RESERVE:
                raise


def cached_batches(arrays: list[np.ndarray], labels: np.ndarray, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    """(cached tensor, one-hot label) batches: each image once, from one of its views (an array per view),
    drawn afresh every epoch; in order, or shuffled like the image pipeline (same seed, same order)."""
    count, shape = len(labels), arrays[0].shape[1:]
    draw = np.random.default_rng(shuffle_seed)

    def gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = draw.integers(len(arrays), size=len(indices))
        batch = np.empty((len(indices), *shape), np.float32)
        for view in np.unique(views):
            batch[views == view] = arrays[view][indices[views == view]]
        return batch, labels[indices]

    def fetch(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        values, targets = tf.numpy_function(gather, [indices], (tf.float32, tf.float32))
        return tf.ensure_shape(values, (None, *shape)), tf.ensure_shape(targets, (None, labels.shape[1]))

    ds = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        ds = ds.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
    return untuned(ds.batch(batch_size).map(fetch).prefetch(tf.data.AUTOTUNE))


def untuned(ds: tf.data.Dataset) -> tf.data.Dataset:
    """ds without tf.data's autotuning: deleting an autotuned iterator waits for its tuning thread, 1.5-2.3 s
    after most fill passes on 2 cores, and the cached epochs were faster without it too (benchmarks/RESULTS.md);
    AUTOTUNE parallelism then stays at tf.data's default, a call per core (at most 16)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def feeds_for(cfg: DictConfig, model: keras.Model, images: ImageFeeds, splits: dict[str, Split], num_classes: int,
              fingerprint: str, folder: Path, decoded: ImageCache, budget_bytes: float, replicas: int = 1) -> Feeds:
    """The phases' feeds: images (train.feature_cache=false, MixUp on, or several replicas), else cached tensors
    in `folder`.

    decoded: where the fill pass keeps the decoded images; budget_bytes: what the caches may hold in memory."""
    if not cfg.train.feature_cache:
        return images
    if replicas > 1:
        print(f"Feature cache: off under distribute={cfg.distribute} ({replicas} replicas): the cache is filled and "
              "read in one process; training on images.", flush=True)
        mlflow.set_tags({"feature_cache_storage": "off (distributed)", "feature_cache_reused": "no"})
        return images
    if cfg.data.augment.mixup:
        print("Feature cache: off, as data.augment.mixup > 0 (MixUp blends images; blending their features "
              "is not the same); training on images.", flush=True)
        mlflow.set_tags({"feature_cache_storage": "off (mixup)", "feature_cache_reused": "no"})
        return images
    cached = CachedFeeds(model, cfg, images, splits, num_classes, fingerprint, folder, decoded, budget_bytes)
    if not cached.fits_on_disk():
        print(f"Feature cache: off, as its files ({cached.bytes_to_write() / 1e9:.2f} GB) would leave less than "
              f"{DISK_HEADROOM_BYTES / 1e9:g} GB free in {folder}; training on images.", flush=True)
        mlflow.set_tags({"feature_cache_storage": "off (disk)", "feature_cache_reused": "no"})
        return images
    return cached


def remove_files(folder: Path) -> None:
    """Delete a run's cache files once its training is done (this process keeps what it holds)."""
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)
