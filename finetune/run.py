"""One training job in stages: data, two phases, evaluation, cost, MLflow record, export, terminal summary."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from finetune import cost, distribute, feature_cache, image_cache, interrupts, tracking
from finetune.augment import make_augmenter
from finetune.backbones import BACKBONES
from finetune.dataset import (
    SPLITS,
    ImageFolder,
    Split,
    load_images,
    make_dataset,
    split_fingerprint,
    split_folder,
)
from finetune.export import BUNDLE_DIR, bundle_files, export_run
from finetune.evaluate import evaluate, save_confusion_matrix, save_training_curves
from finetune.model import build_classifier
from finetune.model_files import ModelFiles
from finetune.sources import scan_data
from finetune.runfolder import STAGES, Manifest, stage_key, write_json
from finetune.shipped import model_latencies
from finetune.trainer import ImageFeeds, PhaseResult, RunState, balanced_class_weight, train_two_phases
from finetune.weights import resolve as resolve_weights


@dataclass
class PreparedData:
    """A scanned and split dataset, ready to feed any model of a run or a search."""

    folder: ImageFolder
    splits: dict[str, Split]
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.folder.class_names)

    def params(self) -> dict[str, Any]:
        """The data's MLflow params: `data.root`, `data.fingerprint`, `data.train_images`, ..."""
        return {f"data.{key}": value for key, value in self.info.items() if key != "name"}

    def write_lists(self, run_dir: Path) -> None:
        """skipped_images.txt and data_splits.csv in run_dir."""
        _write_skipped(self.folder, run_dir / "skipped_images.txt")
        _write_splits(self.splits, self.folder, run_dir / "data_splits.csv")

    def datasets(self, cfg: DictConfig, replicas: int = 1) -> tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset]:
        """train (shuffled, augmented), val and test pipelines at cfg's input size, batched for `replicas` replicas."""
        augmenter = make_augmenter(cfg.data.augment, cfg.seed)
        cache = self.image_cache(cfg)
        made = {}
        for name in SPLITS:
            split = self.splits[name]
            batches = distribute.replica_batches(cfg.data.batch_size, len(split.paths), replicas)
            made[name] = make_dataset(split, self.num_classes, cfg.backbone.input_size, cfg.data.batch_size,
                                      augmenter if name == "train" else None, seed=cfg.seed, cache=cache).take(batches)
        return made["train"], made["val"], made["test"]

    def feeds(self, cfg: DictConfig, model: keras.Model, cache_folder: Path, replicas: int = 1) -> feature_cache.Feeds:
        """What the phases train on: image batches (for `replicas` replicas), or the model's cached features in
        cache_folder/feature_cache (one replica only).

        The feature cache keeps in memory what memory_budget_gb leaves beside the decoded images held there."""
        train, val, _ = self.datasets(cfg, replicas)
        images = self.image_cache(cfg)
        return feature_cache.feeds_for(cfg, model, ImageFeeds(model, train, val), self.splits, self.num_classes,
                                       self.info["fingerprint"], cache_folder / feature_cache.CACHE_DIR,
                                       images, cfg.memory_budget_gb * 1e9 - self.images_in_memory(cfg), replicas)

    def image_cache(self, cfg: DictConfig) -> image_cache.ImageCache:
        """Where the decoded images stay between epochs (data.cache; auto: memory within memory_budget_gb)."""
        return image_cache.choose(cfg.data.cache, cfg.data.cache_dir, cfg.memory_budget_gb, len(self.folder.paths),
                                  cfg.backbone.input_size)

    def images_in_memory(self, cfg: DictConfig) -> int:
        """Bytes the decoded-image cache holds in memory (0 when it is on disk or off)."""
        if self.image_cache(cfg).mode != "memory":
            return 0
        return image_cache.decoded_bytes(len(self.folder.paths), cfg.backbone.input_size)


def prepare_data(cfg: DictConfig) -> PreparedData:
    """Scan and split the configured data, say which files were skipped, and prune old snapshots (once a run)."""
    data = scan_and_split(cfg)
    data.image_cache(cfg).prune(cfg.data.cache_disk_gb)
    if data.folder.skipped:
        print(f"Skipped {len(data.folder.skipped)} unusable file(s) (listed in skipped_images.txt):")
        for path, reason in data.folder.skipped[:5]:
            print(f"  {path}\t{reason}")
    return data


def scan_and_split(cfg: DictConfig) -> PreparedData:
    """Scan (decode-check every image) and split the configured data: what a run trains on, `finetune scan` shows."""
    folder = scan_data(cfg.data)
    splits = split_folder(folder, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    return PreparedData(folder, splits, dataset_info(cfg.data.name, folder, splits))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; `deterministic` also makes TensorFlow's ops deterministic (slower)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def run_job(
    cfg: DictConfig,
    run_dir: Path,
    tags: dict[str, str] | None = None,
    data: PreparedData | None = None,
    nested: bool = False,
) -> dict[str, Any]:
    """Train, evaluate, time, record and export one configuration in run_dir, each stage once.

    A rerun of the same run folder skips the stages whose result is already there for these settings
    (see runfolder.STAGES): after a failed export only the export runs again.
    """
    manifest = Manifest(run_dir)
    manifest.start("train", cfg)
    if all(manifest.done(stage, stage_key(cfg, stage, manifest)) for stage in STAGES if stage_wanted(cfg, stage)):
        print(f"This run already finished; its results are in {run_dir} (metrics.json).")
        return json.loads((run_dir / METRICS_FILE).read_text())
    strategy = distribute.strategy(cfg.distribute)  # before any other TensorFlow op
    if not distribute.is_chief(cfg.distribute):
        return train_as_worker(cfg, run_dir, manifest, strategy)
    seed_everything(cfg.seed, cfg.deterministic)
    data = data or prepare_data(cfg)
    manifest.check_fingerprint(data.info["fingerprint"], data.folder.source.location)
    data.write_lists(run_dir)
    state = RunState(run_dir / "state.json")
    results = json.loads((run_dir / METRICS_FILE).read_text()) if (run_dir / METRICS_FILE).exists() else {}
    run_tags = {**(tags or {}), "run_dir": str(run_dir.resolve()), **distribute.tags(cfg.distribute, strategy)}
    with tracking.job_run(cfg, manifest, run_tags, data.params(), nested=nested) as (run, started):
        if started:
            for epoch in state.history():  # a run re-recorded in another store keeps its training curve
                mlflow.log_metrics({k: v for k, v in epoch.items() if k != "epoch"}, step=epoch["epoch"])
        with contextlib.closing(_Stages(cfg, run_dir, manifest, state, data, results, strategy)) as stages:
            for stage in STAGES:
                if stage_wanted(cfg, stage):
                    stages.run(stage, getattr(stages, stage))
    _print_summary(results, run_dir, run.info.run_id, cfg.mlflow.tracking_uri)
    return results


def train_as_worker(cfg: DictConfig, run_dir: Path, manifest: Manifest, strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """A multi_worker process other than the chief: trains with the chief, step by step, in its own run folder.

    It keeps only what resuming needs (manifest, state, checkpoints); the chief records, evaluates and exports.
    """
    seed_everything(cfg.seed, cfg.deterministic)
    data = prepare_data(cfg)
    manifest.check_fingerprint(data.info["fingerprint"], data.folder.source.location)
    train_model(cfg, data, run_dir, RunState(run_dir / "state.json"), strategy)
    print(f"Training done as {distribute.cluster_task().describe()}; the chief records, evaluates and exports.")
    return {}


def train_model(cfg: DictConfig, data: PreparedData, run_dir: Path, state: RunState,
                strategy: tf.distribute.Strategy) -> tuple[keras.Model, dict[str, PhaseResult], dict[str, Any]]:
    """Build the classifier and train (or resume) both phases inside the strategy's scope, so its variables
    and both phases' optimizers live on every replica; the model, each phase's result and what the feeds did."""
    class_weight = (balanced_class_weight(data.splits["train"].labels, data.num_classes)
                    if cfg.head.class_weight == "auto" else None)
    with strategy.scope():
        model = build_classifier(cfg, data.num_classes)
        feeds = data.feeds(cfg, model, run_dir, strategy.num_replicas_in_sync)
        phases = train_two_phases(model, cfg, feeds, run_dir, state, class_weight)
    return model, phases, feeds.record


def stage_wanted(cfg: DictConfig, stage: str) -> bool:
    """Every stage runs, except the export when export.formats is empty."""
    return stage != "export" or bool(cfg.export.formats)


class _Stages:
    """The stages of one run after data preparation; each reads what earlier stages left in the run folder."""

    def __init__(self, cfg: DictConfig, run_dir: Path, manifest: Manifest, state: RunState, data: PreparedData,
                 results: dict[str, Any], strategy: tf.distribute.Strategy | None = None) -> None:
        self.cfg, self.run_dir, self.manifest, self.state, self.data = cfg, run_dir, manifest, state, data
        self.strategy = strategy or tf.distribute.get_strategy()
        self.results = results  # what metrics.json holds
        self.model_path = run_dir / "model.keras"
        self._model: keras.Model | None = None
        self._files: ModelFiles | None = None

    def run(self, stage: str, action: Callable[[], None]) -> None:
        """Run a stage unless its result for these settings is there; record it as done."""
        key = stage_key(self.cfg, stage, self.manifest)
        if self.manifest.done(stage, key) and (stage != "train" or self.model_path.exists()):
            return
        interrupts.check()
        action()
        write_json(self.run_dir / METRICS_FILE, self.results)
        self.manifest.mark(stage, key)

    @property
    def model(self) -> keras.Model:
        """The trained model: from this attempt's training, or from model.keras."""
        if self._model is None:
            self._model = keras.saving.load_model(self.model_path, safe_mode=True)
        return self._model

    @property
    def files(self) -> ModelFiles:
        """The model's files (model.keras, SavedModel, TFLite), each made once for the `time` and `export` stages."""
        if self._files is None:
            self._files = bundle_files(self.cfg, self.model, self.data.splits, self.model_path)
        return self._files

    def close(self) -> None:
        """Delete the files the stages made."""
        if self._files is not None:
            self._files.close()

    def train(self) -> None:
        cfg, data = self.cfg, self.data
        weights_source = resolve_weights(BACKBONES[cfg.backbone.name], cfg.backbone, cfg.weights_dir)
        print(f"{cfg.backbone.name} with weights: {weights_source}; {len(data.folder.paths)} images in "
              f"{data.num_classes} classes")
        model, phases, feed_record = train_model(cfg, data, self.run_dir, self.state, self.strategy)
        interrupts.check()
        partial = self.run_dir / "model.partial.keras"  # a kill during the save leaves no half model.keras
        model.save(partial)
        os.replace(partial, self.model_path)
        feature_cache.remove_files(self.run_dir)
        # a distributed model would run every later step on all replicas (and workers): the stages load model.keras
        self._model = model if distribute.is_default(self.strategy) else None
        mlflow.log_param("backbone.weights_source", weights_source)
        self.results.update({
            **{f"{name}_best_val_accuracy": result.best_val_accuracy for name, result in phases.items()},
            **{f"{name}_seconds": result.seconds for name, result in phases.items()},
            "kept_weights_phase": kept_phase(phases),
            "skipped_images": len(data.folder.skipped),
            "classes": data.folder.class_names,
            "dataset": data.info,
            **feed_record,
        })

    def evaluate(self) -> None:
        cfg, names = self.cfg, self.data.folder.class_names
        _, val_ds, test_ds = self.data.datasets(cfg)
        final_val = evaluate(self.model, val_ds, names, cfg.evaluate.top_k)
        test = evaluate(self.model, test_ds, names, cfg.evaluate.top_k)
        (self.run_dir / "classification_report.txt").write_text(test.report_text)
        save_confusion_matrix(test, names, self.run_dir / "confusion_matrix.png")
        save_training_curves(self.state.history(), self.run_dir / "training_curves.png")
        self.results.update({
            "final_val_accuracy": final_val.accuracy,
            "test_accuracy": test.accuracy,
            "test_correct": test.correct,
            "test_images": len(test.y_true),
            "test_top_k": test.top_k,
            f"test_top{test.top_k}_accuracy": test.top_k_accuracy,
            "test_macro_f1": test.report["macro avg"]["f1-score"],
            "report": test.report,
        })

    def time(self) -> None:
        cfg, model = self.cfg, self.model
        shipped, keras_figure = model_latencies(self.files, cfg)
        self.results.update({
            "params": model.count_params(),
            "macs": cost.count_macs(model),
            **latency_metrics(shipped, keras_figure),
            "model_size_mb": self.model_path.stat().st_size / 1e6,
            "latency_protocol": shipped.as_dict(),
            "keras_latency_protocol": keras_figure.as_dict(),
        })

    def record(self) -> None:
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        write_json(self.run_dir / METRICS_FILE, self.results)
        mlflow.log_metrics({k: v for k, v in self.results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tags(latency_tags(cost.Latency(**self.results["latency_protocol"]),
                                     cost.Latency(**self.results["keras_latency_protocol"])))
        for name in _ARTIFACTS:
            mlflow.log_artifact(str(self.run_dir / name))

    def log_model(self) -> None:
        example = load_images(self.data.splits["test"].subset([0]), self.cfg.backbone.input_size)
        tracking.log_keras_model(self.model, example, self.cfg.export.register_model)

    def export(self) -> None:
        data = self.data
        export_run(self.cfg, self.files, data.folder.class_names, data.splits, data.info, self.run_dir / BUNDLE_DIR,
                   self.results["latency_protocol"])


def latency_metrics(shipped: cost.Latency, keras_figure: cost.Latency) -> dict[str, float]:
    """The headline latency (the shipped TFLite file), whether it was timed alone, and the Keras model's."""
    return {
        "latency_median_ms": shipped.median_ms,
        "latency_p90_ms": shipped.p90_ms,
        "latency_exclusive": float(shipped.exclusive),
        "latency_other_cores": shipped.other_cores,
        "keras_latency_median_ms": keras_figure.median_ms,
        "keras_latency_p90_ms": keras_figure.p90_ms,
    }


def latency_tags(shipped: cost.Latency, keras_figure: cost.Latency) -> dict[str, str]:
    """What each latency figure timed ("tflite_float32, LiteRT XNNPACK, 1 thread") and on which device (CPU,
    /device:GPU:0); `finetune report` reads the first."""
    return {"latency.method": shipped.describe(), "keras_latency.method": keras_figure.describe(),
            "latency.device": shipped.device, "keras_latency.device": keras_figure.device}


def kept_phase(phases: dict[str, PhaseResult]) -> int:
    """The phase the kept weights come from: phase 2 only replaces phase 1's checkpoint when it beats it."""
    phase2 = phases.get("phase2")
    return 2 if phase2 is not None and phase2.best_val_accuracy > phases["phase1"].best_val_accuracy else 1


METRICS_FILE = "metrics.json"
_ARTIFACTS = (
    "config.yaml",
    "metrics.json",
    "classification_report.txt",
    "confusion_matrix.png",
    "training_curves.png",
    "data_splits.csv",
    "skipped_images.txt",
)


def _write_skipped(folder: ImageFolder, path: Path) -> None:
    path.write_text("".join(f"{file}\t{reason}\n" for file, reason in folder.skipped))


def _write_splits(splits: dict[str, Split], folder: ImageFolder, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "path", "class"])
        for name in SPLITS:
            for file, label in zip(splits[name].paths, splits[name].labels):
                writer.writerow([name, folder.source.record_name(file), folder.class_names[label]])


def dataset_info(name: str, folder: ImageFolder, splits: dict[str, Split]) -> dict[str, Any]:
    """What data a run used: where, which classes, which split (fingerprint) and how many images."""
    return {
        "name": name,
        **folder.source.info(),
        "classes": ",".join(folder.class_names),
        "fingerprint": split_fingerprint(splits),
        **{f"{split}_images": len(splits[split].paths) for split in SPLITS},
    }


def _print_summary(results: dict[str, Any], run_dir: Path, run_id: str, tracking_uri: str) -> None:
    shipped, keras_figure = (cost.Latency(**results[key]) for key in ("latency_protocol", "keras_latency_protocol"))
    top_k = results["test_top_k"]
    print(
        "\n"
        f"Test accuracy {results['test_accuracy']:.4f} ({results['test_correct']} of {results['test_images']} images; "
        f"top-{top_k} {results[f'test_top{top_k}_accuracy']:.3f}, macro F1 {results['test_macro_f1']:.3f})\n"
        f"Latency {shipped.median_ms:.2f} ms median, {shipped.p90_ms:.2f} ms p90 ({shipped.describe()}; batch 1, "
        f"{shipped.runs} runs after {shipped.warmup} warm-up{'' if shipped.exclusive else _not_alone(shipped)})\n"
        f"Keras model {keras_figure.median_ms:.1f} ms median, {keras_figure.p90_ms:.1f} ms p90 "
        f"(tf.function on {keras_figure.device}, {cost.threads_text(keras_figure.threads)})\n"
        f"Size {results['params'] / 1e6:.2f} M params, {results['macs'] / 1e6:.1f} M MACs, "
        f"model.keras {results['model_size_mb']:.1f} MB\n"
        f"Outputs in {run_dir}\n"
        f"MLflow run {run_id} at {tracking_uri}",
        flush=True,
    )


def _not_alone(latency: cost.Latency) -> str:
    return f"; not alone: other processes kept {latency.other_cores:.1f} cores busy"
