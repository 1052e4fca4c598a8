"""Two-phase fine-tuning: head only, then the top blocks at a low SGD learning rate; resumable."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import keras
import mlflow
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from finetune import interrupts
from finetune.backbones import BACKBONES
from finetune.checkpoints import BestCheckpoint, repair_backup
from finetune.evaluate import effective_top_k
from finetune.model import freeze_backbone, model_backbone, unfreeze_top_blocks
from finetune.runfolder import JsonRecord

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


class RunState(JsonRecord):
    """state.json: every epoch's metrics and each finished phase, so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, {"epochs": {}})

    def record_epoch(self, epoch: int, phase: int, logs: dict[str, float]) -> None:
        self.data["epochs"][str(epoch)] = {"phase": phase, **logs}
        self.save()

    def history(self) -> list[dict[str, float]]:
        """Per-epoch records in epoch order, with `epoch` (1-based, global) and `phase`."""
        return [{"epoch": int(e), **rec} for e, rec in sorted(self.data["epochs"].items(), key=lambda kv: int(kv[0]))]

    def best_val_accuracy(self, phase: int | None = None) -> float | None:
        """The best validation accuracy recorded, over all epochs or over one phase's."""
        values = [rec["val_accuracy"] for rec in self.data["epochs"].values()
                  if "val_accuracy" in rec and phase in (None, rec["phase"])]
        return max(values) if values else None


class EpochRecorder(keras.callbacks.Callback):
    """After every epoch: metrics to the run state and to the MLflow run, if there is one (step = global epoch)."""

    def __init__(self, phase: int, state: RunState) -> None:
        super().__init__()
        self.phase = phase
        self.state = state

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        if mlflow.active_run() is not None:  # none on a multi_worker process other than the chief
            mlflow.log_metrics({**metrics, "phase": self.phase}, step=epoch + 1)
        self.state.record_epoch(epoch + 1, self.phase, metrics)


class StopOnSignal(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at a step or epoch boundary once Ctrl-C or `kill` arrived."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupts.check()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        interrupts.check()


@dataclass
class PhaseResult:
    """What one phase did."""

    epochs: int  # global epoch count at the end of the phase
    best_val_accuracy: float  # over this phase's own epochs
    seconds: float  # wall time of the attempt that finished the phase


def balanced_class_weight(labels: list[int], num_classes: int) -> dict[int, float]:
    """scikit-learn's 'balanced' weights: n_samples / (n_classes * count per class)."""
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels))
    return dict(enumerate(weights.tolist()))


@dataclass
class Feed:
    """What one phase fits: a model whose weights are the classifier's (all of it, or the part above a
    cache) and its training and validation batches."""

    model: keras.Model
    train: tf.data.Dataset
    val: tf.data.Dataset


class Feeds(Protocol):
    """Each phase's feed, asked for once the backbone is frozen (phase 1) or its top unfrozen (phase 2)."""

    steps_per_epoch: int
    record: dict[str, Any]  # what the feeds did (for metrics.json), e.g. whether a cache was reused

    def phase1(self) -> Feed: ...

    def phase2(self) -> Feed: ...


class ImageFeeds:
    """train.feature_cache=false: both phases fit the whole classifier on image batches."""

    def __init__(self, model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset) -> None:
        self.feed = Feed(model, train_ds, val_ds)
        self.steps_per_epoch = int(train_ds.cardinality())
        self.record: dict[str, Any] = {}

    def phase1(self) -> Feed:
        return self.feed

    def phase2(self) -> Feed:
        return self.feed


def train_two_phases(
    model: keras.Model,
    cfg: Any,
    feeds: Feeds,
    run_dir: Path,
    state: RunState,
    class_weight: dict[int, float] | None = None,
) -> dict[str, PhaseResult]:
    """Run (or resume) both phases; the model ends with the best weights on validation accuracy."""
    best_path = run_dir / "checkpoints" / "best.weights.h5"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    train, backbone = cfg.train, model_backbone(model)
    spec = BACKBONES[cfg.backbone.name]
    fit = dict(classifier=model, cfg=cfg, run_dir=run_dir, state=state, best_path=best_path,
               class_weight=class_weight)
    steps_per_epoch = feeds.steps_per_epoch

    freeze_backbone(backbone)
    results = {"phase1": _run_phase(feeds.phase1, lambda: phase1_optimizer(train.phase1, steps_per_epoch),
                                    1, 0, train.phase1.epochs, **fit)}
    _load_best(model, best_path)

    if cfg.backbone.unfreeze_blocks > 0 and train.phase2.epochs > 0:
        unfrozen = unfreeze_top_blocks(backbone, spec, cfg.backbone.unfreeze_blocks)
        state.update(unfrozen_blocks=unfrozen)
        start = results["phase1"].epochs
        results["phase2"] = _run_phase(feeds.phase2, lambda: phase2_optimizer(train.phase2, steps_per_epoch),
                                       2, start, start + train.phase2.epochs, **fit)
        _load_best(model, best_path)  # best of both phases: phase 2 only saves when it beats phase 1
    return results


def phase1_optimizer(phase1_cfg: Any, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The configured optimizer at the phase's learning rate."""
    return OPTIMIZERS[phase1_cfg.optimizer](learning_rate=learning_rate(phase1_cfg, steps_per_epoch))


def phase2_optimizer(phase2_cfg: Any, steps_per_epoch: int) -> keras.optimizers.SGD:
    """SGD with momentum at the phase's (low) rate; each gradient element clipped to +-clipvalue when set.

    Clipping element-wise tames the few channels whose huge downstream weights (e.g. the folded-BatchNorm
    MobileNetV3Small approximation) give their inputs gradients ~90x the rest, without slowing the others.
    """
    return keras.optimizers.SGD(
        learning_rate=learning_rate(phase2_cfg, steps_per_epoch),
        momentum=phase2_cfg.momentum,
        clipvalue=phase2_cfg.clipvalue,
    )


def learning_rate(phase_cfg: Any, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The phase's learning rate: constant, or cosine-decayed to zero by the phase's end; with a warm-up,
    it first rises linearly from zero over the first `warmup_fraction` of the phase's steps."""
    rate, steps = phase_cfg.learning_rate, phase_cfg.epochs * steps_per_epoch
    warmup_steps = int(phase_cfg.warmup_fraction * steps)
    if phase_cfg.schedule == "constant" and not warmup_steps:
        return rate
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else rate,
        decay_steps=steps - warmup_steps,
        alpha=1.0 if phase_cfg.schedule == "constant" else 0.0,  # alpha 1: the rate stays where the warm-up left it
        warmup_target=rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def _load_best(model: keras.Model, best_path: Path) -> None:
    """Load the best checkpoint's model weights (its optimizer state belongs to the other phase)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_path)


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, cfg: Any) -> None:
    top_k = effective_top_k(cfg.evaluate.top_k, model.output_shape[-1])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(k=top_k, name=f"top{top_k}_accuracy")],
    )


def _run_phase(
    feed_of_phase: Callable[[], Feed],
    optimizer: Callable[[], keras.optimizers.Optimizer],
    phase: int,
    initial_epoch: int,
    epochs: int,
    *,
    classifier: keras.Model,
    cfg: Any,
    run_dir: Path,
    state: RunState,
    best_path: Path,
    class_weight: dict[int, float] | None,
) -> PhaseResult:
    """Fit one phase, or return its recorded result when an earlier attempt finished it.

    The best checkpoint always holds the whole classifier's weights, whichever model the feed fits."""
    key = f"phase{phase}"
    if state.get(key):
        return PhaseResult(**state.get(key))
    started = time.perf_counter()  # the phase's time includes filling its feed (a feature cache)
    feed = feed_of_phase()
    _compile(feed.model, optimizer(), cfg)
    backup_dir = run_dir / "checkpoints" / f"backup_{key}"
    repair_backup(backup_dir)
    callbacks = [  # the recorder runs before the backup, so a resumed run never misses a recorded epoch
        BestCheckpoint(best_path, state.best_val_accuracy(), classifier),
        EpochRecorder(phase, state),
        keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=cfg.train.early_stopping_patience),
        StopOnSignal(),  # last: an epoch's checkpoints are written before it stops
    ]
    print(f"Phase {phase}: epochs {initial_epoch + 1}..{epochs}", flush=True)
    feed.model.fit(
        feed.train,
        validation_data=feed.val,
        initial_epoch=initial_epoch,
        epochs=epochs,
        callbacks=callbacks,
        class_weight=class_weight,
        shuffle=False,  # the training dataset shuffles itself
        verbose=1 if sys.stdout.isatty() else 2,  # progress bars on a terminal, one line per epoch in logs
    )
    phase_epochs = [rec["epoch"] for rec in state.history() if rec["phase"] == phase]
    result = PhaseResult(
        epochs=max(phase_epochs, default=initial_epoch),
        best_val_accuracy=state.best_val_accuracy(phase) or 0.0,
        seconds=time.perf_counter() - started,
    )
    state.update(**{key: asdict(result)})
    interrupts.check()  # a stop asked for after the last step boundary: the phase is recorded as done
    return result
