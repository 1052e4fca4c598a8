"""CPU and wall time of an epoch of augmented training input: Keras's three stacked layers against one resampling.

The training split of the shared flowers (split seed 0) goes through `finetune.dataset.make_dataset` as a run
feeds it (decoded-image cache in memory, shuffled, batches of 32 at 224 px), once with the default augmentation
as `finetune.augment` does it (flip, turn and zoom in one bilinear resampling) and once with what it replaced:
keras.layers.RandomFlip, RandomRotation and RandomZoom stacked (the flip a pass of its own, two resamplings).
Both pipelines are filled first, then timed in alternating rounds; the figure is the median over the rounds of
the process's CPU seconds and the wall seconds an epoch.

Usage:
    python benchmarks/augment_cost.py [--rounds 5] [--size 224]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from finetune.augment import augmentation_seeds, make_augmenter
from finetune.config import compose
from finetune.dataset import make_dataset, scan_folder, split_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resplit import SHARED_FLOWERS  # noqa: E402


def keras_layers(augment_cfg: Any, seed: int):
    """The augmentation before finetune.augment: Keras's three layers, stacked, with these settings."""
    seeds = augmentation_seeds(seed)["geometric"]
    stack = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seeds),
                              keras.layers.RandomRotation(augment_cfg.rotation, fill_mode="reflect", seed=seeds + 1),
                              keras.layers.RandomZoom((-augment_cfg.zoom, augment_cfg.zoom), fill_mode="reflect",
                                                      seed=seeds + 2)])
    return lambda images, labels: (stack(images, training=True), labels)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def epoch_cost(dataset: tf.data.Dataset) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one pass."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in dataset:
        pass
    return cpu_seconds() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        train = split_folder(scan_folder(SHARED_FLOWERS, scratch), 0.15, 0.15, seed=0)["train"]
        augment_cfg = compose([]).data.augment  # the defaults of conf/data/flowers.yaml
        sides = {"keras layers": keras_layers(augment_cfg, 0), "one resampling": make_augmenter(augment_cfg, 0)}
        pipelines = {name: make_dataset(train, 5, args.size, 32, augmenter, seed=0) for name, augmenter in sides.items()}
        for pipeline in pipelines.values():
            epoch_cost(pipeline)  # decode into the cache, trace the functions
        costs: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
        for round_ in range(args.rounds):
            for name in (list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))):
                costs[name].append(epoch_cost(pipelines[name]))
    print(f"{len(train.paths)} training images at {args.size} px, {args.rounds} rounds, median per epoch:")
    medians = {name: [statistics.median(column) for column in zip(*rows)] for name, rows in costs.items()}
    for name, (cpu, wall) in medians.items():
        print(f"  {name:15s} CPU {cpu:5.2f} s ({1000 * cpu / len(train.paths):.2f} ms an image), wall {wall:5.2f} s")
    (old_cpu, old_wall), (new_cpu, new_wall) = medians.values()
    print(f"  one resampling: {old_cpu / new_cpu:.2f}x less CPU, {old_wall / new_wall:.2f}x less wall time")


if __name__ == "__main__":
    main()
