"""`python -m finetune.export RUN`: (re-)export a finished run; also the export step of every training run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune import tracking
from finetune.artifacts import ExportError
from finetune.bundle import ArtifactReport, artifact_table, export_bundle
from finetune.bundle_folder import METADATA_FILE
from finetune.config import CONF_DIR, UsageError, validate_export
from finetune.dataset import ImageBatches, Split, load_images, read_splits
from finetune.model_files import ModelFiles
from finetune.quantization import Int8Data, summary
from finetune.runfolder import MANIFEST_FILE, Manifest
from finetune.sources import source_of

BUNDLE_DIR = "export"


def export_run(
    cfg: DictConfig,
    files: ModelFiles,
    class_names: list[str],
    splits: dict[str, Split],
    dataset: dict[str, Any],
    bundle_dir: Path,
    headline: dict[str, Any] | None = None,
) -> list[ArtifactReport]:
    """Build the bundle for a trained model from its files (`bundle_files`) and record it in the active MLflow run.

    headline: the run's own latency protocol and figures (metrics.json `latency_protocol`), for the model card.
    """
    size = cfg.backbone.input_size
    test_images = ImageBatches(splits["test"], size)  # decoded batch by batch by each measure, never all at once
    run = mlflow.active_run()
    metadata = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "input_size": size,
        "dataset": dataset,
        "mlflow_run_id": run.info.run_id if run else None,
        "versions": {name: version(name) for name in ("tensorflow", "keras", "ai-edge-litert", "mlflow")},
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}, {os.cpu_count()} cores",
        "latency": {**OmegaConf.to_container(cfg.latency, resolve=True), "headline": headline},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    reports = export_bundle(
        files,
        bundle_dir,
        class_names=class_names,
        test_images=test_images,
        test_labels=np.asarray(splits["test"].labels),
        int8_data=int8_data(cfg, splits) if "tflite_int8" in cfg.export.formats else None,
        export_cfg=cfg.export,
        latency_cfg=cfg.latency,
        metadata=metadata,
    )
    print(f"\nExport bundle in {bundle_dir} (measured on {len(test_images)} test images):\n{artifact_table([asdict(r) for r in reports])}")
    int8 = json.loads((bundle_dir / METADATA_FILE).read_text()).get("int8")
    if int8:
        print(summary(int8))
    if run:
        _log_bundle(bundle_dir, reports)
    return reports


def bundle_files(cfg: DictConfig, model: keras.Model, splits: dict[str, Split], keras_file: Path | None) -> ModelFiles:
    """The files a run's `time` and `export` stages share; the SavedModel gets `serve` when the bundle ships it."""
    top_k = cfg.evaluate.top_k if "saved_model" in cfg.export.formats else None
    return ModelFiles(model, top_k, partial(calibration_images, cfg, splits), keras_file)


def int8_data(cfg: DictConfig, splits: dict[str, Split]) -> Int8Data:
    """The validation split that chooses the int8 recipe, and the training images that calibrate it."""
    val = splits["val"]
    return Int8Data(ImageBatches(val, cfg.backbone.input_size), np.asarray(val.labels),
                    partial(calibration_images, cfg, splits), len(splits["train"].paths))


def calibration_images(cfg: DictConfig, splits: dict[str, Split], count: int | None = None) -> np.ndarray:
    """The first `count` training images (default export.representative_images; all when fewer) in an order fixed by the seed."""
    train = splits["train"]
    order = np.random.default_rng(cfg.seed).permutation(len(train.paths))
    chosen = order[:cfg.export.representative_images if count is None else count]
    return load_images(train.subset(sorted(chosen)), cfg.backbone.input_size)


def _log_bundle(bundle_dir: Path, reports: list[ArtifactReport]) -> None:
    for report in reports:
        mlflow.log_metrics({
            f"export.{report.format}.{key}": getattr(report, key)
            for key in ("size_mb", "accuracy", "accuracy_delta", "top1_agreement", "latency_median_ms", "latency_p90_ms")
        })
    mlflow.log_artifacts(str(bundle_dir), artifact_path=BUNDLE_DIR)  # every file, the SavedModel folder too


def resolve_run_dir(run: str, tracking_uri: str) -> Path:
    """A run directory given as a path, or as an MLflow run id (its `run_dir` tag)."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    try:
        tracking.require_store(tracking_uri)
    except UsageError as error:
        raise UsageError(f"run={run} is neither a run directory nor an MLflow run id ({error})") from None
    try:
        tags = mlflow.MlflowClient(tracking_uri).get_run(run).data.tags
    except Exception:  # MLflow raises its own error types for an unknown id or store
        raise UsageError(f"run={run} is neither a run directory nor an MLflow run id in {tracking_uri}") from None
    if "run_dir" not in tags:
        raise UsageError(f"MLflow run {run} has no run_dir tag; pass the run directory instead")
    return Path(tags["run_dir"])


def with_new_keys(saved: DictConfig) -> DictConfig:
    """A saved run's export settings, with the default of every key added since the run (export.int8.*)."""
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "export" / "default.yaml"), saved)


def export_saved_run(run_dir: Path, formats: list[str] | None) -> list[ArtifactReport]:
    """Export the model a finished run saved, with its own config and data splits."""
    needed = [run_dir / name for name in ("config.yaml", "model.keras", "data_splits.csv", "metrics.json", MANIFEST_FILE)]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise UsageError(f"{run_dir} is not a finished run directory (missing {', '.join(missing)})")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.export = with_new_keys(cfg.export)
    if formats is not None:
        cfg.export.formats = formats
    validate_export(cfg.export)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    mlflow_run = Manifest(run_dir).get("mlflow") or {}
    dataset = metrics["dataset"]
    splits = read_splits(run_dir / "data_splits.csv", source_of(dataset), metrics["classes"])
    model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    with (tracking.tracked_run(cfg.mlflow, mlflow_run.get("run_id"), {}),
          bundle_files(cfg, model, splits, run_dir / "model.keras") as files):
        return export_run(cfg, files, metrics["classes"], splits, dataset, run_dir / BUNDLE_DIR,
                          metrics.get("latency_protocol"))


def main(argv: list[str] | None = None) -> None:
    """Command line of `python -m finetune.export` / `finetune export`."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune export", description="Export a finished run's model as a bundle.")
    parser.add_argument("run", help="run directory (experiments/runs/...) or MLflow run id")
    parser.add_argument("--formats", help="comma-separated formats (default: the run's export.formats)")
    parser.add_argument("--tracking-uri", default=tracking.DEFAULT_STORE, help="to look up an MLflow run id")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_dir = resolve_run_dir(args.run, args.tracking_uri)
        export_saved_run(run_dir, args.formats.split(",") if args.formats else None)
    except UsageError as error:
        fail(error)
    except ExportError as error:
        print(f"finetune: export failed: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
