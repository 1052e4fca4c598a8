"""The real CLI end to end on tiny synthetic images: outputs, MLflow record, resume after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, litert_median_ms, quick_overrides

pytestmark = pytest.mark.slow


def mlflow_client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'experiments' / 'mlflow.db'}")


def only_run(client: MlflowClient) -> mlflow.entities.Run:
    experiment = client.get_experiment_by_name("finetune")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_full_run_leaves_outputs_and_one_mlflow_run(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "experiments" / "runs" / "first"
    result = cli(*quick_overrides(tiny_images, run_dir, "export.formats=[keras,tflite_int8]"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    for name in ("model.keras", "metrics.json", "classification_report.txt", "confusion_matrix.png",
                 "training_curves.png", "config.yaml", "data_splits.csv", "skipped_images.txt"):
        assert (run_dir / name).is_file(), name
    skipped = (run_dir / "skipped_images.txt").read_text()
    assert "corrupt.jpg" in skipped and "notes.txt" in skipped
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["skipped_images"] == 2
    epochs = json.loads((run_dir / "state.json").read_text())["epochs"].values()
    for phase in (1, 2):  # each phase's own best, not the best so far
        own = max(epoch["val_accuracy"] for epoch in epochs if epoch["phase"] == phase)
        assert metrics[f"phase{phase}_best_val_accuracy"] == pytest.approx(own)
    best = max(metrics["phase1_best_val_accuracy"], metrics["phase2_best_val_accuracy"])
    assert metrics["final_val_accuracy"] == pytest.approx(best)  # the best weights of both phases are kept
    assert metrics["kept_weights_phase"] == (2 if metrics["phase2_best_val_accuracy"] > metrics["phase1_best_val_accuracy"] else 1)
    assert metrics["params"] > 0 and metrics["macs"] > 0 and metrics["latency_median_ms"] > 0
    # the headline is the default latency.format (not in this bundle) run by LiteRT at 1 thread, not the Keras model
    protocol = metrics["latency_protocol"]
    assert (protocol["method"], protocol["threads"]) == ("tflite_float32, LiteRT XNNPACK", 1)
    assert metrics["latency_median_ms"] * 3 < metrics["keras_latency_median_ms"]
    assert "ms p90 (tflite_float32, LiteRT XNNPACK, 1 thread; batch 1, 5 runs after 2 warm-up" in result.stdout
    assert str(run_dir) in result.stdout
    for noise in ("oneDNN", "absl::InitializeLog", "cuda", "Creating initial MLflow database tables", "\x1b["):
        assert noise not in result.stdout + result.stderr, noise  # the product's own lines only

    client = mlflow_client(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"mobilenet_v3_small a1.0 32px {tiny_images.name}"  # what it is, not a random name
    assert run.data.params["backbone.name"] == "mobilenet_v3_small"
    split_rows = (run_dir / "data_splits.csv").read_text().splitlines()[1:]
    assert run.data.params["data.train_images"] == str(sum(row.startswith("train,") for row in split_rows))
    assert len(split_rows) == 42  # every usable image, in exactly one split
    test_images = sum(row.startswith("test,") for row in split_rows)
    correct = round(metrics["test_accuracy"] * test_images)
    assert f"Test accuracy {metrics['test_accuracy']:.4f} ({correct} of {test_images} images;" in result.stdout
    for key in ("test_accuracy", "test_top2_accuracy", "params", "macs", "latency_median_ms", "latency_p90_ms",
                "latency_exclusive", "keras_latency_median_ms", "keras_latency_p90_ms"):
        assert key in run.data.metrics, key
    for key in ("test_accuracy", "latency_median_ms", "keras_latency_median_ms"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    latency_params = {key: run.data.params[key] for key in ("latency.format", "latency.threads", "latency.keras_threads")}
    assert latency_params == {"latency.format": "tflite_float32", "latency.threads": "1", "latency.keras_threads": "None"}
    assert run.data.tags["latency.method"] == "tflite_float32, LiteRT XNNPACK, 1 thread"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # both phases on one axis
    phases = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "phase")}
    assert phases == {1: 1, 2: 1, 3: 2, 4: 2}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "training_curves.png", "classification_report.txt", "export"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} >= {
        "export/model_int8.tflite", "export/labels.txt", "export/model_card.md", "export/metadata.json"}
    assert "export.tflite_int8.latency_median_ms" in run.data.metrics
    logged_models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in logged_models] == [run.info.run_id]  # the Keras model, with its signature
    requirements = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{logged_models[0].artifact_location}/requirements.txt", dst_path=str(tmp_path / "logged")
    )).read_text()
    assert f"tensorflow=={version('tensorflow')}" in requirements and f"keras=={version('keras')}" in requirements
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "labels.txt", "metadata.json", "model.keras", "model_card.md", "model_int8.tflite"]

    bundle = run_dir / "export"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    predicted = cli("predict", str(bundle), str(tiny_images / "class_2"), str(broken), "--json", cwd=tmp_path)
    assert predicted.returncode == 1  # one file failed, the others were predicted
    results = json.loads(predicted.stdout)["results"]
    assert json.loads(predicted.stdout)["format"] == "tflite_int8"
    assert len(results) == 15 and sum("error" in r for r in results) == 1
    assert next(r for r in results if "error" in r)["path"] == str(broken)
    assert all(len(r["predictions"]) == 3 for r in results if "error" not in r)  # top 3 of 3 classes
    assert f"{broken}: error: not a readable image" in predicted.stderr

    reexported = cli("export", str(run_dir), "--formats", "tflite_float32", cwd=tmp_path)
    assert reexported.returncode == 0, reexported.stderr[-2000:]
    assert sorted(p.name for p in bundle.iterdir()) == ["labels.txt", "metadata.json", "model_card.md", "model_float32.tflite"]
    direct = litert_median_ms(bundle / "model_float32.tflite", threads=1)  # the file itself, timed without finetune
    assert direct / 3 < metrics["latency_median_ms"] < direct * 3, (metrics["latency_median_ms"], direct)
    assert f"headline latency (`latency_median_ms` in MLflow and metrics.json), timed before the export: " \
           f"{metrics['latency_median_ms']:.2f} ms median" in (bundle / "model_card.md").read_text()
    by_id = cli("export", run.info.run_id, "--formats", "keras", cwd=tmp_path)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    assert (bundle / "model.keras").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "no_such_bundle", "x.jpg"], "is not a folder"),
        (["predict", ".", "x.jpg"], "is not a complete export bundle"),
        (["export", "no_such_run"], "neither a run directory nor an MLflow run id"),
    ],
)
def test_bad_bundle_or_run_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_missing_imagenet_weights_name_the_file_and_where(tmp_path: Path, tiny_images: Path) -> None:
    overrides = quick_overrides(tiny_images, tmp_path / "run", "backbone.weights=imagenet", "backbone.input_size=224")
    result = cli(*overrides, cwd=tmp_path, env={"KERAS_HOME": str(tmp_path / "keras_home")})
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("finetune: error: ImageNet weights for mobilenet_v3_small")
    assert "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in last_line
    assert str(tmp_path / "keras_home" / "models") in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_without_repeating_finished_epochs(tmp_path: Path, tiny_images: Path, stop: int) -> None:
    run_dir = tmp_path / "experiments" / "runs" / "resumable"
    overrides = quick_overrides(tiny_images, run_dir, "train.phase1.epochs=3", "train.phase2.epochs=12",
                                "train.early_stopping_patience=100")
    process = subprocess.Popen([sys.executable, "-m", "finetune", *overrides], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_path = run_dir / "state.json"
    wait_for(lambda: state_path.exists() and '"phase": 2' in state_path.read_text(), "a phase-2 epoch")
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    if stop == signal.SIGTERM:  # stopped cleanly at the next step: KILLED in MLflow, the resume command printed
        assert process.returncode == 130, stderr[-2000:]
        assert "Resume with:" in stderr and f"hydra.run.dir={run_dir}" in stderr
        assert only_run(mlflow_client(tmp_path)).info.status == "KILLED"
    else:  # kill -9: nothing ran after the signal, the MLflow run is left RUNNING
        assert process.returncode == -signal.SIGKILL
    interrupted = json.loads(state_path.read_text())
    assert "phase1" in interrupted and "phase2" not in interrupted
    done_before = len(interrupted["epochs"])

    resumed = cli(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Phase 1:" not in resumed.stdout  # phase 1 is not trained again
    final = json.loads(state_path.read_text())
    assert [int(e) for e in final["epochs"]] == list(range(1, 16))
    first_epoch = int(resumed.stdout.split("Epoch ")[1].split("/")[0])
    assert first_epoch in (done_before, done_before + 1)  # phase 2 carries on from its last saved epoch
    run = only_run(mlflow_client(tmp_path))  # the same MLflow run, re-opened
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client(tmp_path).get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(set(steps)) == list(range(1, 16))


def test_a_failed_or_killed_export_reruns_the_export_only(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "experiments" / "runs" / "export"
    overrides = quick_overrides(tiny_images, run_dir, "export.formats=[tflite_float16]")
    failed = cli(*overrides, "export.tolerance.float16=1e-12", cwd=tmp_path)  # float16 weights drift more than that
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "export failed: tflite_float16 differs" in failed.stderr and "to retry the export only" in failed.stderr
    assert (run_dir / "model.keras").is_file() and not (run_dir / "export").exists()
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    plot_time = (run_dir / "confusion_matrix.png").stat().st_mtime_ns

    process = subprocess.Popen([sys.executable, "-m", "finetune", *overrides], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "export.partial").exists(), "the export to start")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    resumed = cli(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Phase " not in resumed.stdout and "Export bundle in" in resumed.stdout
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "labels.txt", "metadata.json", "model_card.md", "model_float16.tflite"]
    assert json.loads((run_dir / "metrics.json").read_text())["test_accuracy"] == evaluated["test_accuracy"]
    assert (run_dir / "confusion_matrix.png").stat().st_mtime_ns == plot_time  # not evaluated again
    client = mlflow_client(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(logged) == 1  # the model was logged once, by the first attempt
