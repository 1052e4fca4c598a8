"""Sweeps through Hydra's cluster launchers, in their local modes: submitit (Slurm) and Ray (slow tier).

They need the `cluster` extra (pip install -e ".[cluster]"), which .ci/run installs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import quick_overrides
from finetune.config import compose

pytestmark = pytest.mark.slow


def sweep(launcher: str, data: Path, sweep_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """A two-job sweep (seed=1,2) of a few-second run through `hydra/launcher=<launcher>`."""
    overrides = [o for o in quick_overrides(data, sweep_dir, "train.phase2.epochs=0", "train.phase1.epochs=1")
                 if not o.startswith("hydra.run.dir")]
    command = [sys.executable, "-m", "finetune", "-m", f"hydra/launcher={launcher}", *overrides, "seed=1,2",
               f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200)


def finished_jobs(project: Path, sweep_dir: Path) -> list[str]:
    """The seeds of the finished MLflow runs of this sweep."""
    client = MlflowClient(f"sqlite:///{project / 'experiments' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    return sorted(run.data.params["seed"] for run in found
                  if run.info.status == "FINISHED" and run.data.tags.get("sweep_dir") == str(sweep_dir)
                  and "test_accuracy" in run.data.metrics)


@pytest.mark.parametrize(("launcher", "plugin"), [("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
                                                  ("ray_local", "hydra_plugins.hydra_ray_launcher")])
def test_two_job_sweep_through_a_cluster_launcher(launcher: str, plugin: str, tmp_path: Path, tiny_images: Path) -> None:
    pytest.importorskip(plugin, reason='the cluster launchers: pip install -e ".[cluster]"')
    done = sweep(launcher, tiny_images, tmp_path / "sweep", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished_jobs(tmp_path, tmp_path / "sweep") == ["1", "2"]
    assert all((tmp_path / "sweep" / job / "metrics.json").is_file() for job in ("0", "1"))


def test_the_slurm_config_is_the_submitit_slurm_launcher() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
    launcher = compose(["hydra/launcher=slurm"], hydra_node=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
