"""Training and searching beyond one process: tf.distribute strategies and Keras-Tuner's distributed search.

The rules are tested in process; the real thing runs the CLI in several processes on 127.0.0.1 (slow tier):
MirroredStrategy over two logical CPU devices, two MultiWorkerMirroredStrategy workers from TF_CONFIG, and a
Keras-Tuner chief with two workers. Each must end as one process would: one finished MLflow run with test
metrics, or N distinct trials under one parent run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, SHARED_FLOWERS, quick_overrides
from finetune import distribute, search_cluster
from finetune.config import UsageError, compose, validate

FLOWERS = f"data.path={SHARED_FLOWERS}"
TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from finetune.cli import main
main(sys.argv[1:])
"""


def tf_config(workers: list[str], index: int, chief: str | None = None, task: str = "worker") -> str:
    cluster = {"worker": workers, **({"chief": [chief]} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task, "index": index}})


@pytest.mark.parametrize(
    ("config", "chief", "size"),
    [
        (tf_config(["a:1", "b:1"], 0), True, 2),  # worker 0 is the chief when there is no chief task
        (tf_config(["a:1", "b:1"], 1), False, 2),
        (tf_config(["a:1"], 0, chief="c:1"), False, 2),  # a chief task takes the role from worker 0
        (tf_config(["a:1"], 0, chief="c:1", task="chief"), True, 2),
    ],
)
def test_the_chief_is_the_chief_task_or_else_worker_zero(config: str, chief: bool, size: int) -> None:
    task = distribute.cluster_task({"TF_CONFIG": config})
    assert (task.is_chief, task.cluster_size) == (chief, size)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, "distribute=multi_worker needs TF_CONFIG"),
        ("{not json", "TF_CONFIG is not a cluster and a task"),
        (json.dumps({"cluster": {"worker": ["a:1"]}}), "TF_CONFIG is not a cluster and a task (KeyError"),
        (tf_config(["a:1"], 3), "TF_CONFIG's task worker 3 is not in its cluster (1 worker)"),
        (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}}),
         "TF_CONFIG has task types ps; multi_worker trains with chief and worker tasks only"),
    ],
)
def test_multi_worker_without_a_usable_tf_config_is_one_line(config: str | None, expected: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if config is not None:
        monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(UsageError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")) as refused:
        validate(compose([FLOWERS, "distribute=multi_worker"]))
    assert "\n" not in str(refused.value)


def test_distribute_values_and_a_search_in_one_process_per_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:1"], 1))
    for mode in ("none", "auto", "mirrored", "multi_worker"):
        validate(compose([FLOWERS, f"distribute={mode}"]))
    with pytest.raises(UsageError, match="^distribute=gpus must be none, auto, mirrored or multi_worker"):
        validate(compose([FLOWERS, "distribute=gpus"]))
    with pytest.raises(UsageError, match="^distribute=mirrored does not apply to mode=tune: each trial trains in one"):
        validate(compose([FLOWERS, "mode=tune", "distribute=mirrored"]))


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1"},
         "a distributed search needs KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT; "
         "KERASTUNER_ORACLE_PORT is not set"),
        ({"KERASTUNER_TUNER_ID": "t0", "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "http"},
         "KERASTUNER_ORACLE_PORT=http must be a port number (1..65535)"),
    ],
)
def test_an_incomplete_search_environment_is_one_line(environment: dict[str, str], expected: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        validate(compose([FLOWERS, "mode=tune"]))
    validate(compose([FLOWERS]))  # a training run ignores them


def test_search_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERASTUNER_ORACLE_IP", raising=False)
    assert search_cluster.role() == "single"
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "10.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    for tuner_id, role in (("chief", "chief"), ("tuner0", "worker")):
        monkeypatch.setenv("KERASTUNER_TUNER_ID", tuner_id)
        assert search_cluster.role() == role
    assert search_cluster.search_tag() == "finetune.search_run.10.0.0.1_8000"


@pytest.mark.parametrize(("images", "replicas", "batches"), [(28, 2, 4), (25, 2, 3), (27, 2, 4), (7, 2, 1), (1, 1, 1)])
def test_no_replica_gets_an_empty_batch(images: int, replicas: int, batches: int) -> None:
    """28 images in batches of 8 end with 4 (2 each); 25 end with 1, which would leave a replica with none."""
    assert distribute.replica_batches(8, images, replicas) == batches


def test_a_split_smaller_than_the_replicas_is_one_line() -> None:
    with pytest.raises(UsageError, match="^a data split has 1 image"):
        distribute.replica_batches(8, 1, 2)


# ---- the slow tier: real processes on 127.0.0.1 ----

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nobody listens on it (SO_REUSEADDR: connections closing in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path, script: str | None = None) -> subprocess.Popen:
    """`python -m finetune ARGS` (or `python -c SCRIPT ARGS`) in the background, its output in `log`."""
    full_env = {key: value for key, value in os.environ.items() if key != "FINETUNE_WEIGHTS_DIR"}
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT), **env})
    command = [sys.executable, *(["-c", script] if script else ["-m", "finetune"]), *args]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=output, stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def finish(processes: dict[str, subprocess.Popen], timeout: float = 900) -> dict[str, str]:
    """Wait for every process; their outputs. A process still running at the deadline is killed and fails the test."""
    deadline = time.monotonic() + timeout
    for name, process in processes.items():
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes.values():
                other.kill()
                other.wait()
            pytest.fail(f"{name} did not finish:\n" + process.log.read_text()[-3000:])
    return {name: process.log.read_text() for name, process in processes.items()}


def runs(project: Path) -> list:
    client = MlflowClient(f"sqlite:///{project / 'experiments' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("finetune").experiment_id])


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_is_one_run(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "run"
    args = quick_overrides(tiny_images, run_dir, "distribute=mirrored", "train.phase1.epochs=1", "train.phase2.epochs=1")
    outputs = finish({"mirrored": start(args, tmp_path, {}, tmp_path / "mirrored.log", TWO_CPUS)})
    assert "Test accuracy" in outputs["mirrored"], outputs["mirrored"][-3000:]
    run, = runs(tmp_path)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert (run.data.tags["distribute.strategy"], run.data.tags["distribute.replicas"]) == ("mirrored", "2")
    assert (run.data.tags["latency.device"], run.data.tags["keras_latency.device"]) == ("CPU", "CPU")  # no GPU here
    assert len(json.loads((run_dir / "state.json").read_text())["epochs"]) == 2  # both phases trained


@pytest.mark.slow
def test_two_workers_from_tf_config_train_one_model_and_only_the_chief_records(tmp_path: Path, tiny_images: Path) -> None:
    ports = [free_port(), free_port()]
    workers = [f"127.0.0.1:{port}" for port in ports]
    processes = {
        f"worker{index}": start(
            quick_overrides(tiny_images, tmp_path / f"worker{index}", "distribute=multi_worker",
                            "train.phase1.epochs=1", "train.phase2.epochs=1"),
            tmp_path, {"TF_CONFIG": tf_config(workers, index)}, tmp_path / f"worker{index}.log")
        for index in range(2)
    }
    outputs = finish(processes)
    assert all(process.returncode == 0 for process in processes.values()), outputs
    assert "Training done as worker 1 of 2 processes" in outputs["worker1"]
    run, = runs(tmp_path)  # the chief's; the other worker opened none
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert (run.data.tags["distribute.strategy"], run.data.tags["distribute.replicas"],
            run.data.tags["distribute.processes"]) == ("multi_worker", "2", "2")
    chief_epochs = json.loads((tmp_path / "worker0" / "state.json").read_text())["epochs"]
    other_epochs = json.loads((tmp_path / "worker1" / "state.json").read_text())["epochs"]
    assert chief_epochs == other_epochs and len(chief_epochs) == 2  # one model: the same metrics every epoch
    assert sorted(path.name for path in (tmp_path / "worker1").iterdir()) == [
        ".hydra", "checkpoints", "cli.log", "manifest.json", "state.json"]  # resume files only
    assert all(port_is_free(port) for port in ports)


def search_overrides(data: Path, run_dir: Path, trials: int) -> list[str]:
    return quick_overrides(data, run_dir, "mode=tune", "tuner.alpha=[0.75,1.0]", "tuner.phase1_epochs=1",
                           "tuner.phase2_epochs=0", "train.phase1.epochs=1", "train.phase2.epochs=0",
                           f"tuner.max_trials={trials}")


def start_search(tmp_path: Path, data: Path, port: int, round_name: str, trials: int = 3) -> dict[str, subprocess.Popen]:
    """A chief and two workers on 127.0.0.1:port, each in its own run folder (the same folders every round)."""
    return {
        tuner_id: start(search_overrides(data, tmp_path / tuner_id, trials), tmp_path,
                        {"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1",
                         "KERASTUNER_ORACLE_PORT": str(port)}, tmp_path / f"{tuner_id}{round_name}.log")
        for tuner_id in ("chief", "tuner0", "tuner1")
    }


def assert_one_search(tmp_path: Path, trials: int) -> None:
    """One finished parent run, `trials` distinct finished trials under it, and one retrained best."""
    found = runs(tmp_path)
    parent, = [run for run in found if run.data.tags.get("kind") == "search"]
    assert parent.info.status == "FINISHED"
    finished = [run for run in found if run.data.tags.get("kind") == "trial" and run.info.status == "FINISHED"]
    assert sorted(run.data.tags["trial_id"] for run in finished) == [str(n) for n in range(trials)]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in finished)
    assert {run.data.tags["tuner_id"] for run in finished} <= {"tuner0", "tuner1"}
    best, = [run for run in found if run.data.tags.get("kind") == "best"]
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id and "test_accuracy" in best.data.metrics
    assert parent.data.tags["best_trial"] == best.data.tags["best_trial"]


@pytest.mark.slow
def test_a_chief_and_two_tuner_workers_run_every_trial_once_under_one_parent(tmp_path: Path, tiny_images: Path) -> None:
    port = free_port()
    processes = start_search(tmp_path, tiny_images, port, "")
    outputs = finish(processes)
    assert all(process.returncode == 0 for process in processes.values()), outputs
    assert not any("Traceback" in output for output in outputs.values()), outputs
    assert_one_search(tmp_path, trials=3)
    tuner_ids = {run.data.tags["tuner_id"] for run in runs(tmp_path) if run.data.tags.get("kind") == "trial"}
    assert tuner_ids == {"tuner0", "tuner1"}  # both workers ran trials; the chief ran none
    assert port_is_free(port)


@pytest.mark.slow
def test_an_interrupted_distributed_search_resumes(tmp_path: Path, tiny_images: Path) -> None:
    port, trials = free_port(), 8  # enough that the search is still running when trial 0 is done (trials are seconds)
    processes = start_search(tmp_path, tiny_images, port, "-1", trials)
    first_done = tmp_path / "chief" / "tuner" / "trial_0" / "trial.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (
            first_done.exists() and json.loads(first_done.read_text()).get("status") == "COMPLETED"):
        time.sleep(0.2)
    workers = (processes["tuner0"], processes["tuner1"])
    for worker in workers:  # both at once, workers first: the chief then has nobody to wait for
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=300)
    processes["chief"].send_signal(signal.SIGTERM)
    processes["chief"].wait(timeout=300)
    assert processes["chief"].returncode == 130  # a worker told "no trial left" just before may have ended (0)
    assert {processes[name].returncode for name in ("tuner0", "tuner1")} <= {0, 130}
    assert [run.info.status for run in runs(tmp_path) if run.data.tags.get("kind") == "search"] == ["KILLED"]

    resumed = start_search(tmp_path, tiny_images, port, "-2", trials)
    outputs = finish(resumed)
    assert all(process.returncode == 0 for process in resumed.values()), outputs
    assert not any("Trial 0:" in output for output in outputs.values())  # the finished trial is not run again
    assert_one_search(tmp_path, trials=trials)
    assert port_is_free(port)
