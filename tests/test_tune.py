"""mode=tune, multirun sweeps and the trade-off report, through the real CLI on tiny images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner as kt
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, quick_overrides
from finetune.tuning import best_within_budget

pytestmark = pytest.mark.slow


def tune_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return quick_overrides(data, run_dir, "mode=tune", "backbone=mobilenet_v2", "tuner.alpha=[0.35,1.0]",
                           "tuner.phase1_epochs=1", "tuner.phase2_epochs=1", "train.phase1.epochs=1",
                           "train.phase2.epochs=1", *extra)


def runs_by_kind(project: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{project / 'experiments' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune")
    kinds: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        kinds.setdefault(run.data.tags.get("kind", "run"), []).append(run)
    return kinds


def trial(trial_id: str, latency: float, accuracy: float) -> kt.engine.trial.Trial:
    made = kt.engine.trial.Trial(kt.HyperParameters(), trial_id=trial_id)
    made.metrics.update("latency_median_ms", latency)
    made.metrics.update("val_accuracy", accuracy)
    return made


def test_latency_budget_excludes_slow_trials_from_best() -> None:
    best_first = [trial("a", 20.0, 0.95), trial("b", 8.0, 0.90), trial("c", 4.0, 0.80)]
    assert best_within_budget(best_first, None).trial_id == "a"
    assert best_within_budget(best_first, 10.0).trial_id == "b"
    assert best_within_budget(best_first, 8.0).trial_id == "b"  # the budget itself is allowed
    assert best_within_budget(best_first, 1.0) is None


def test_search_records_parent_trials_and_retrained_best_then_reports(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "search"
    # a budget the shipped TFLite files meet and the Keras models (tf.function, several ms here) do not
    result = cli(*tune_overrides(tiny_images, run_dir, "tuner.max_trials=2", "tuner.max_latency_ms=1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = runs_by_kind(tmp_path)
    parent, = kinds["search"]
    trials, best = kinds["trial"], kinds["best"]
    assert len(trials) == 2 and len(best) == 1
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in trials + best)
    for run in trials:
        assert {"final_val_accuracy", "latency_median_ms", "latency_p90_ms", "params", "macs"} <= set(run.data.metrics)
        assert run.data.params["hp.alpha"] in ("0.35", "1.0")
        assert (run.data.params["latency.format"], run.data.params["latency.threads"]) == ("tflite_float32", "1")
        assert run.data.tags["latency.method"] == "tflite_float32, LiteRT XNNPACK, 1 thread"
        latency, keras_latency = run.data.metrics["latency_median_ms"], run.data.metrics["keras_latency_median_ms"]
        assert latency <= 1 < keras_latency and run.data.metrics["within_latency_budget"] == 1.0
        assert run.info.status == "FINISHED"
    assert "test_accuracy" in best[0].data.metrics  # the best is retrained and tested
    assert parent.data.tags["best_trial"] == best[0].data.tags["best_trial"]
    assert (run_dir / "best" / "model.keras").is_file()

    reported = cli("report", "finetune", "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-2000:]
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # two trials and the retrained best; the parent search run has no model
    assert (tmp_path / "report" / "pareto.png").is_file()
    assert "Latency: tflite_float32, LiteRT XNNPACK, 1 thread." in (tmp_path / "report" / "runs.md").read_text()
    assert "report" in runs_by_kind(tmp_path)


def test_no_trial_within_budget_means_no_best(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "search"
    result = cli(*tune_overrides(tiny_images, run_dir, "tuner.max_trials=1", "tuner.max_latency_ms=0.0001"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No trial met tuner.max_latency_ms=0.0001" in result.stdout
    kinds = runs_by_kind(tmp_path)
    assert len(kinds["trial"]) == 1 and "best" not in kinds
    assert kinds["trial"][0].data.metrics["within_latency_budget"] == 0.0
    assert not (run_dir / "best" / "model.keras").exists()


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "search"
    overrides = tune_overrides(tiny_images, run_dir, "tuner.max_trials=2")
    process = subprocess.Popen([sys.executable, "-m", "finetune", *overrides], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_trial = run_dir / "tuner" / "trial_0" / "trial.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if first_trial.exists() and json.loads(first_trial.read_text()).get("status") == "COMPLETED":
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 130
    assert runs_by_kind(tmp_path)["search"][0].info.status == "KILLED"

    resumed = cli(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Trial 0:" not in resumed.stdout  # the finished trial is not trained again
    kinds = runs_by_kind(tmp_path)
    assert len(kinds["search"]) == 1 and kinds["search"][0].info.status == "FINISHED"  # re-opened, not duplicated
    finished = [run for run in kinds["trial"] if run.info.status == "FINISHED"]
    assert sorted(run.data.tags["trial_id"] for run in finished) == ["0", "1"]


def test_multirun_invalid_job_fails_alone(tmp_path: Path, tiny_images: Path) -> None:
    overrides = [o for o in quick_overrides(tiny_images, tmp_path / "unused") if not o.startswith("hydra.run.dir")]
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "-m", *overrides, "backbone.unfreeze_blocks=99,2",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]  # the sweep finishes, then reports the bad job
    assert "finetune: error in job 0 (" in result.stderr
    assert result.stderr.rstrip().endswith("finetune: 1 sweep job(s) failed: 0")
    assert "backbone.unfreeze_blocks=99 is out of range" in result.stderr
    assert "Traceback" not in result.stderr
    jobs = runs_by_kind(tmp_path)["run"]
    assert len(jobs) == 1 and jobs[0].info.status == "FINISHED"  # the valid job ran to the end
    assert jobs[0].data.params["backbone.unfreeze_blocks"] == "2"
    assert jobs[0].data.tags["sweep_dir"] == str(tmp_path / "sweep")
