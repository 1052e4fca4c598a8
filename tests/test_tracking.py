"""MLflow run lifecycle and the small helpers the trainer relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from finetune.config import flatten
from finetune.tracking import tracked_run
from finetune.trainer import RunState, balanced_class_weight


def mlflow_cfg(tmp_path: Path):
    return OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t",
                             "artifact_location": str(tmp_path / "artifacts"), "run_name": None})


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_run_that_stops_is_never_left_running(tmp_path: Path, error: type[BaseException], status: str) -> None:
    cfg = mlflow_cfg(tmp_path)
    with pytest.raises(error), tracked_run(cfg, None, {}) as run:
        raise error()
    assert MlflowClient(cfg.tracking_uri).get_run(run.info.run_id).info.status == status
    assert mlflow.active_run() is None


def test_reopening_a_run_keeps_one_run(tmp_path: Path) -> None:
    cfg = mlflow_cfg(tmp_path)
    with tracked_run(cfg, None, {}) as first:
        mlflow.log_metric("x", 1, step=1)
    with tracked_run(cfg, first.info.run_id, {}) as second:
        mlflow.log_metric("x", 2, step=2)
    client = MlflowClient(cfg.tracking_uri)
    assert second.info.run_id == first.info.run_id
    assert [m.value for m in client.get_metric_history(first.info.run_id, "x")] == [1, 2]
    assert client.get_experiment_by_name("t").artifact_location == (tmp_path / "artifacts").as_uri()


def test_flatten_resolves_and_joins_keys() -> None:
    cfg = OmegaConf.create({"a": {"b": 1, "c": [1, 2]}, "d": "${a.b}"})
    assert flatten(cfg) == {"a.b": 1, "a.c": [1, 2], "d": 1}


def test_balanced_class_weight_is_inverse_frequency() -> None:
    assert balanced_class_weight([0, 0, 0, 1], 2) == pytest.approx({0: 4 / 6, 1: 2.0})


def test_run_state_survives_a_reload_and_orders_epochs(tmp_path: Path) -> None:
    state = RunState(tmp_path / "state.json")
    for epoch, phase, val in ((2, 1, 0.5), (1, 1, 0.4), (10, 2, 0.7)):
        state.record_epoch(epoch, phase, {"val_accuracy": val})
    again = RunState(tmp_path / "state.json")
    assert [rec["epoch"] for rec in again.history()] == [1, 2, 10]
    assert again.best_val_accuracy() == 0.7


def test_jobs_starting_together_on_a_new_sqlite_store_all_get_the_experiment(tmp_path: Path) -> None:
    """Parallel sweep jobs (e.g. Hydra's joblib launcher) race to create MLflow's tables and the experiment."""
    script = (
        "from omegaconf import OmegaConf; from finetune.tracking import setup; "
        f"print(setup(OmegaConf.create({dict(mlflow_cfg(tmp_path))!r})))"
    )
    jobs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 3, [err[-600:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, the same id for every job
