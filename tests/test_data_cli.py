"""The real CLI on data: `finetune scan`, and a whole run (training, evaluation, int8 calibration, the export's
measurements, the split record, MLflow) from a TFDS dataset prepared offline, then its re-export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest

from conftest import cli
from finetune.dataset import split_fingerprint, split_folder
from finetune.tfds_source import scan_tfds
from test_tfds_source import prepared_beans  # noqa: F401  (a fixture: beans downloaded from 127.0.0.1 and prepared)

pytestmark = pytest.mark.slow


def test_scan_command_as_a_user_runs_it(tiny_images: Path, tmp_path: Path) -> None:
    done = cli("scan", "data=folder", f"data.path={tiny_images}", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{tiny_images.resolve()}: 42 usable images in 3 classes, 2 skipped" in done.stdout
    assert "Traceback" not in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]  # no experiments/, no run folder
    refused = cli("scan", "data=folder", f"data.path={tiny_images / 'class_0'}", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("finetune: error: ") and refused.stderr.count("\n") == 1
    assert "at least 2 are needed" in refused.stderr


def test_a_run_on_a_tfds_dataset_trains_exports_and_records_it(prepared_beans: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path / 'runs.db'}"
    overrides = ["backbone=mobilenet_v3_small", "backbone.weights=null", "backbone.input_size=32", "data=tfds",
                 "data.dataset=beans", f"data.tfds_dir={prepared_beans}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.batch_size=4", "train.phase1.epochs=1", "train.phase2.epochs=1", "latency.warmup=1",
                 "latency.runs=3", "export.formats=[tflite_int8]", "export.representative_images=4",
                 f"mlflow.tracking_uri={store}", f"hydra.run.dir={run_dir}"]
    done = cli(*overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"]["tfds"] == "beans" and metrics["test_images"] == 6
    assert metrics["classes"] == ["angular_leaf_spot", "bean_rust", "healthy"]
    with (run_dir / "data_splits.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({row["split"]: 0 for row in rows}) == ["test", "train", "val"] and len(rows) == 24
    assert {row["path"].split("/")[0] for row in rows if row["split"] == "val"} == {"validation"}
    expected = split_fingerprint(split_folder(scan_tfds("beans", prepared_beans), 0.15, 0.15, seed=0))
    assert json.loads((run_dir / "manifest.json").read_text())["split_fingerprint"] == expected
    params = mlflow.MlflowClient(store).search_runs(["1"])[0].data.params
    assert params["data.tfds"] == "beans" and params["data.fingerprint"] == expected
    bundle_metadata = json.loads((run_dir / "export" / "metadata.json").read_text())
    assert bundle_metadata["dataset"]["fingerprint"] == expected
    again = cli("export", str(run_dir), "--formats", "tflite_float32", "--tracking-uri", store, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "export" / "model_float32.tflite").exists()
