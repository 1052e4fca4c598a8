"""One training job: data, model, two phases, evaluation, cost, MLflow record, terminal summary."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from finetune import cost, interrupts, tracking
from finetune.backbones import BACKBONES
from finetune.dataset import (
    SPLITS,
    ImageFolder,
    Split,
    load_images,
    make_augmenter,
    make_dataset,
    scan_folder,
    split_fingerprint,
    split_folder,
)
from finetune.export import BUNDLE_DIR, export_run
from finetune.evaluate import Evaluation, evaluate, save_confusion_matrix, save_training_curves
from finetune.model import build_classifier
from finetune.sources import data_root
from finetune.trainer import RunState, balanced_class_weight, train_two_phases
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

    def write_lists(self, run_dir: Path) -> None:
        """skipped_images.txt and data_splits.csv in run_dir."""
        _write_skipped(self.folder, run_dir / "skipped_images.txt")
        _write_splits(self.splits, self.folder, run_dir / "data_splits.csv")

    def datasets(self, cfg: DictConfig) -> tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset]:
        """train (shuffled, augmented), val and test pipelines at cfg's input size."""
        size, batch = cfg.backbone.input_size, cfg.data.batch_size
        augmenter = make_augmenter(cfg.data.augment, cfg.seed)
        train = make_dataset(self.splits["train"], self.num_classes, size, batch, augmenter, seed=cfg.seed)
        val, test = (make_dataset(self.splits[name], self.num_classes, size, batch) for name in ("val", "test"))
        return train, val, test


def prepare_data(cfg: DictConfig) -> PreparedData:
    """Scan (reporting skipped files) and split the configured data."""
    folder = scan_folder(data_root(cfg.data))
    if folder.skipped:
        print(f"Skipped {len(folder.skipped)} unusable file(s) (listed in skipped_images.txt):")
        for path, reason in folder.skipped[:5]:
            print(f"  {path}\t{reason}")
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
    """Train, evaluate and record one configuration in run_dir (resuming what is already there)."""
    state = RunState(run_dir / "state.json")
    if state.get("finished"):
        print(f"This run already finished; its results are in {run_dir} (metrics.json).")
        return json.loads((run_dir / "metrics.json").read_text())
    seed_everything(cfg.seed, cfg.deterministic)
    data = data or prepare_data(cfg)
    data.write_lists(run_dir)
    folder, splits, dataset = data.folder, data.splits, data.info
    num_classes = data.num_classes
    weights_source = resolve_weights(BACKBONES[cfg.backbone.name], cfg.backbone, cfg.weights_dir)
    print(f"{cfg.backbone.name} with weights: {weights_source}; {len(folder.paths)} images in {num_classes} classes")
    model = build_classifier(cfg, num_classes)
    train_ds, val_ds, test_ds = data.datasets(cfg)
    class_weight = balanced_class_weight(splits["train"].labels, num_classes) if cfg.head.class_weight == "auto" else None

    run_tags = {**(tags or {}), "run_dir": str(run_dir.resolve())}
    with tracking.tracked_run(cfg.mlflow, state.get("mlflow_run_id"), run_tags, nested=nested) as run:
        if not state.get("mlflow_run_id"):
            state.update(mlflow_run_id=run.info.run_id)
            mlflow.log_params(tracking.flatten(cfg))
            mlflow.log_params({**{f"data.{k}": v for k, v in dataset.items() if k != "name"},
                               "backbone.weights_source": weights_source})
        phases = train_two_phases(model, cfg, train_ds, val_ds, run_dir, state, class_weight)
        interrupts.check()
        final_val = evaluate(model, val_ds, folder.class_names, cfg.evaluate.top_k)
        evaluation = evaluate(model, test_ds, folder.class_names, cfg.evaluate.top_k)
        latency = cost.measure_latency(model, cfg.latency.warmup, cfg.latency.runs)
        model_path = run_dir / "model.keras"
        model.save(model_path)
        metrics = {
            **{f"{name}_best_val_accuracy": result.best_val_accuracy for name, result in phases.items()},
            **{f"{name}_seconds": result.seconds for name, result in phases.items()},
            "final_val_accuracy": final_val.accuracy,
            "test_accuracy": evaluation.accuracy,
            f"test_top{evaluation.top_k}_accuracy": evaluation.top_k_accuracy,
            "test_macro_f1": evaluation.report["macro avg"]["f1-score"],
            "params": model.count_params(),
            "macs": cost.count_macs(model),
            "latency_median_ms": latency.median_ms,
            "latency_p90_ms": latency.p90_ms,
            "model_size_mb": model_path.stat().st_size / 1e6,
            "skipped_images": len(folder.skipped),
        }
        _write_outputs(cfg, run_dir, state, evaluation, folder, metrics, latency.as_dict(), dataset)
        mlflow.log_metrics(metrics)
        mlflow.log_params({f"latency.{k}": v for k, v in latency.as_dict().items() if k not in ("median_ms", "p90_ms")})
        for name in _ARTIFACTS:
            mlflow.log_artifact(str(run_dir / name))
        example = load_images(splits["test"].paths[:1], cfg.backbone.input_size)
        tracking.log_keras_model(model, example, cfg.export.register_model)
        interrupts.check()
        if cfg.export.formats:
            export_run(cfg, model, folder.class_names, splits, dataset, run_dir / BUNDLE_DIR)
        state.update(finished=True)
    _print_summary(evaluation, metrics, latency, run_dir, run.info.run_id, cfg.mlflow.tracking_uri)
    return metrics


_ARTIFACTS = (
    "config.yaml",
    "metrics.json",
    "classification_report.txt",
    "confusion_matrix.png",
    "training_curves.png",
    "data_splits.csv",
    "skipped_images.txt",
)


def _write_outputs(
    cfg: DictConfig,
    run_dir: Path,
    state: RunState,
    evaluation: Evaluation,
    folder: ImageFolder,
    metrics: dict[str, float],
    latency: dict[str, Any],
    dataset: dict[str, Any],
) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "classification_report.txt").write_text(evaluation.report_text)
    save_confusion_matrix(evaluation, folder.class_names, run_dir / "confusion_matrix.png")
    save_training_curves(state.history(), run_dir / "training_curves.png")
    record = {**metrics, "latency_protocol": latency, "classes": folder.class_names, "dataset": dataset,
              "report": evaluation.report}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=1))


def _write_skipped(folder: ImageFolder, path: Path) -> None:
    path.write_text("".join(f"{file}\t{reason}\n" for file, reason in folder.skipped))


def _write_splits(splits: dict[str, Split], folder: ImageFolder, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "path", "class"])
        for name in SPLITS:
            for file, label in zip(splits[name].paths, splits[name].labels):
                writer.writerow([name, Path(file).relative_to(folder.root), folder.class_names[label]])


def dataset_info(name: str, folder: ImageFolder, splits: dict[str, Split]) -> dict[str, Any]:
    """What data a run used: where, which classes, which split (fingerprint) and how many images."""
    return {
        "name": name,
        "root": str(folder.root.resolve()),
        "classes": ",".join(folder.class_names),
        "fingerprint": split_fingerprint(splits, folder.root),
        **{f"{split}_images": len(splits[split].paths) for split in SPLITS},
    }


def _print_summary(
    evaluation: Evaluation,
    metrics: dict[str, float],
    latency: cost.Latency,
    run_dir: Path,
    run_id: str,
    tracking_uri: str,
) -> None:
    print(
        "\n"
        f"Test accuracy {evaluation.accuracy:.4f} ({evaluation.correct} of "
        f"{len(evaluation.y_true)} images; top-{evaluation.top_k} {evaluation.top_k_accuracy:.3f}, "
        f"macro F1 {metrics['test_macro_f1']:.3f})\n"
        f"Latency {latency.median_ms:.1f} ms median, {latency.p90_ms:.1f} ms p90 "
        f"(batch 1, {latency.threads} threads, {latency.runs} runs after {latency.warmup} warm-up)\n"
        f"Size {metrics['params'] / 1e6:.2f} M params, {metrics['macs'] / 1e6:.1f} M MACs, "
        f"model.keras {metrics['model_size_mb']:.1f} MB\n"
        f"Outputs in {run_dir}\n"
        f"MLflow run {run_id} at {tracking_uri}",
        flush=True,
    )
