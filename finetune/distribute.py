"""Training over several devices or machines with TensorFlow's own tf.distribute strategies.

`distribute=none` trains in one process on TensorFlow's default device. `mirrored` keeps one copy of the
model on every local GPU (MirroredStrategy; without GPUs, on every logical CPU device: normally one, two in
the tests). `multi_worker` trains one model over the processes that the standard TF_CONFIG variable names
(MultiWorkerMirroredStrategy), each process with a run folder of its own. `auto` is mirrored when the
machine has several GPUs, none otherwise.

data.batch_size is the GLOBAL batch: each step's batch is split over the replicas, so a config takes the
same steps, with the same learning-rate schedule, on any number of replicas. The learning rates are those
of that global batch: raise data.batch_size with the replicas and scale the rates yourself (e.g. linearly).

Only the chief (TF_CONFIG's `chief` task, or `worker` 0 when there is none) records the MLflow run,
evaluates, times and exports. The other workers take their part in every training step and keep only
their own resume files (manifest, state, checkpoints) in their own run folder.

The TF_CONFIG checks are pure Python (the CLI runs them before Hydra starts); TensorFlow is imported
only where a strategy is made.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.config import UsageError

if TYPE_CHECKING:
    import tensorflow as tf

TF_CONFIG = "TF_CONFIG"
TASK_TYPES = ("chief", "worker")  # the tasks MultiWorkerMirroredStrategy trains with
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


@dataclass(frozen=True)
class Task:
    """This process in a TF_CONFIG cluster."""

    type: str
    index: int
    cluster_size: int  # chief and worker tasks together
    has_chief_task: bool

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster has no chief task (TensorFlow's own rule)."""
        return self.type == "chief" or (not self.has_chief_task and self.index == 0)

    def describe(self) -> str:
        return f"{self.type} {self.index} of {self.cluster_size} processes"


def cluster_task(environ: dict[str, str] | None = None) -> Task:
    """This process's task in TF_CONFIG; UsageError (one line) when TF_CONFIG is missing or not a cluster."""
    text = (os.environ if environ is None else environ).get(TF_CONFIG)
    if not text:
        raise UsageError(f"distribute=multi_worker needs {TF_CONFIG} (the cluster and this process's task), e.g. "
                         f"{TF_CONFIG_EXAMPLE}")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(f"{TF_CONFIG} is not a cluster and a task ({type(error).__name__}: {error}); "
                         f"e.g. {TF_CONFIG_EXAMPLE}") from None
    others = sorted(set(cluster) - set(TASK_TYPES))
    if others:
        raise UsageError(f"{TF_CONFIG} has task types {', '.join(others)}; multi_worker trains with "
                         f"{' and '.join(TASK_TYPES)} tasks only")
    if task_type not in TASK_TYPES or not 0 <= index < len(cluster.get(task_type, [])):
        raise UsageError(f"{TF_CONFIG}'s task {task_type} {index} is not in its cluster "
                         f"({', '.join(f'{len(cluster[name])} {name}' for name in cluster)})")
    size = sum(len(cluster.get(name, [])) for name in TASK_TYPES)
    return Task(task_type, index, size, has_chief_task=bool(cluster.get("chief")))


def check(mode: str, tune: bool) -> None:
    """What the schema cannot say: multi_worker needs TF_CONFIG; a search trains each trial in one process."""
    if tune and mode != "none":
        raise UsageError(f"distribute={mode} does not apply to mode=tune: each trial trains in one process; "
                         "spread a search over GPUs or machines with Keras-Tuner's workers "
                         "(KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT)")
    if mode == "multi_worker":
        cluster_task()


def is_chief(mode: str) -> bool:
    """Whether this process records, evaluates and exports: always, except on multi_worker's other workers."""
    return mode != "multi_worker" or cluster_task().is_chief


@functools.cache
def strategy(mode: str) -> tf.distribute.Strategy:
    """The process's strategy for `distribute=mode`, made once.

    Call it before any other TensorFlow op: MultiWorkerMirroredStrategy sets up collective ops, which
    TensorFlow allows only before it starts.
    """
    import tensorflow as tf

    if mode == "auto":
        mode = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if mode == "none":
        return tf.distribute.get_strategy()
    repair_keras_distribution()
    if mode == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_default(chosen: tf.distribute.Strategy) -> bool:
    """Whether `chosen` is TensorFlow's default (no distribution): its models serve as they are."""
    import tensorflow as tf

    return chosen is tf.distribute.get_strategy()


def tags(mode: str, chosen: tf.distribute.Strategy) -> dict[str, str]:
    """What the run was trained with: the strategy, its replicas and processes (MLflow tags)."""
    import tensorflow as tf

    processes = cluster_task().cluster_size if mode == "multi_worker" else 1
    name = ("none" if is_default(chosen) else
            "multi_worker" if isinstance(chosen, tf.distribute.MultiWorkerMirroredStrategy) else "mirrored")
    return {"distribute.strategy": name,
            "distribute.replicas": str(chosen.num_replicas_in_sync),
            "distribute.processes": str(processes)}


def replica_batches(batch_size: int, images: int, replicas: int) -> int:
    """How many batches of a split to feed, so that every replica gets images in every step.

    oneDNN's CPU kernels fail on a replica with no images, which a last batch smaller than the replica count
    would give some; that batch (at most replicas - 1 images, other ones each epoch as the training split is
    reshuffled) is left out. Only training sees this: the chief evaluates every image.
    """
    if images < replicas:
        raise UsageError(f"a data split has {images} image(s), fewer than the {replicas} replicas; "
                         "give it more images (data.val_fraction, data.test_fraction) or use fewer replicas")
    full, rest = divmod(images, batch_size)
    return full + (rest >= replicas)


@functools.cache
def repair_keras_distribution() -> None:
    """Two fixes to Keras 3.15's TensorFlow trainer, without which `fit` fails under these strategies
    (keras-team/keras#20585, tensorflow/tensorflow#72388); once per process, for every model.

    - Every fit and evaluate first builds the metrics and optimizer from the first batch averaged over all
      replicas, which fails under MultiWorkerMirroredStrategy (its reduce takes no nested batch) and under
      MirroredStrategy when the replicas' parts differ in size. The build needs only the batch's shapes:
      it is given this process's first replica's part, with no exchange at all.
    - Every step's logs are averaged over the workers along an axis that scalar logs lack. The logs are
      already the same on every replica (metric variables are summed over the replicas as they update),
      so the first replica's are taken, as Keras does under TPUStrategy.
    """
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
        if reduction == "auto" and trainer._collective_all_reduce_multi_worker(strategy):
            reduction = "first"
        return keras_reduce(values, strategy, reduction)

    def maybe_symbolic_build(model: Any, iterator: Any = None, data_batch: Any = None) -> None:
        if model._distribute_strategy is None:  # made outside any strategy: Keras builds it when it traces
            return
        strategy = model.distribute_strategy
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = trainer.tree.map_structure(
                    lambda part: strategy.experimental_local_results(part)[0], next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
