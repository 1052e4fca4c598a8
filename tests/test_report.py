"""The Pareto front on hand-made points (ties included), and the report of a real MLflow store: every page of
runs, one front per data split, trials under their search's split, labelled points, and the command line."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.store.entities import PagedList
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from finetune import report
from finetune.report import Candidate, SplitGroup, collect, draw, pareto_front, write_report

MAX_ACC_MIN_LATENCY = (True, False)
FLOWERS = {"name": "flowers", "root": "/data/flowers", "fingerprint": "f1f1f1f1f1f1f1f1"}
DIGITS = {"name": "digits", "root": "/data/digits", "fingerprint": "d2d2d2d2d2d2d2d2"}


def test_dominated_points_are_off_the_front() -> None:
    points = [(0.90, 10.0), (0.80, 5.0), (0.85, 12.0), (0.70, 6.0), (0.95, 30.0)]
    # (0.85, 12) is beaten by (0.90, 10); (0.70, 6) by (0.80, 5)
    assert pareto_front(points, MAX_ACC_MIN_LATENCY) == [True, True, False, False, True]


def test_ties_stay_on_the_front_together() -> None:
    points = [(0.9, 10.0), (0.9, 10.0), (0.9, 12.0), (0.8, 10.0)]
    # identical points do not dominate each other; equal accuracy but slower, or equal latency but less accurate, is dominated
    assert pareto_front(points, MAX_ACC_MIN_LATENCY) == [True, True, False, False]


def test_size_as_a_third_objective_can_put_a_point_back_on_the_front() -> None:
    points = [(0.9, 10.0, 5.0), (0.85, 12.0, 1.0)]
    assert pareto_front([p[:2] for p in points], MAX_ACC_MIN_LATENCY) == [True, False]
    assert pareto_front(points, (True, False, False)) == [True, True]


def test_single_point_and_empty_input() -> None:
    assert pareto_front([(0.5, 1.0)], MAX_ACC_MIN_LATENCY) == [True]
    assert pareto_front([], MAX_ACC_MIN_LATENCY) == []


SHIPPED = "tflite_float32, LiteRT XNNPACK, 1 thread"


def candidate(run_id: str, name: str, val: float, latency: float, number: int, front: bool,
              timing: str = SHIPPED) -> Candidate:
    return Candidate(run_id, name, "trial", FLOWERS["fingerprint"], "flowers", "/data/flowers", val, None, latency, 1e6,
                     timing, number, front, front)


def test_report_files_and_every_point_labelled(tmp_path: Path) -> None:
    flowers = SplitGroup(FLOWERS["fingerprint"], [
        candidate("a", "fast", 0.8, 2.0, 1, True),
        Candidate("b", "slow", "run", FLOWERS["fingerprint"], "flowers", "/data/flowers", 0.9, 0.88, 9.0, 3e6, SHIPPED, 2,
                  True, True),
        candidate("c", "worse", 0.7, 9.5, 3, False),
    ])
    unknown = SplitGroup("", [Candidate("d", "old run", "run", "", "", "", 0.5, None, 4.0, 2e6, SHIPPED, 1, True, True)])
    files = write_report([flowers, unknown], tmp_path, "exp")
    assert [f.name for f in files] == ["runs.csv", "runs.md", "pareto.png"]
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,name,kind,fingerprint,data_name,data_root,val_accuracy") and len(rows) == 5
    table = (tmp_path / "runs.md").read_text()
    assert "## flowers (split f1f1f1f1f1f1f1f1)" in table
    assert "Data `flowers` at `/data/flowers`, split fingerprint `f1f1f1f1f1f1f1f1`: 3 runs." in table
    assert "| 2 | slow | run | 0.900 | 0.880 | 9.00 | 3.00 | yes | yes |" in table
    assert "| 3 | worse | trial | 0.700 |  | 9.50 | 1.00 |  |  |" in table
    assert "## unknown data" in table and "1 run that recorded no data split" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    figure = draw([flowers, unknown], "exp")
    labels = [{text.get_text() for text in ax.texts} for ax in figure.axes]
    # one panel per split; front points carry their name, the point off the front its number (runs.md names it)
    assert labels == [{"1 fast", "2 slow", "3"}, {"1 old run"}]
    assert [ax.get_title() for ax in figure.axes] == ["flowers (split f1f1f1f1f1f1f1f1): 3 runs", "unknown data: 1 run"]
    assert f"Latency: {SHIPPED}." in table  # what was timed, once per split
    assert figure.axes[0].get_xlabel() == f"latency, batch 1, median (ms): {SHIPPED}"


def test_a_split_timed_in_different_ways_says_so(tmp_path: Path) -> None:
    keras = "keras model, tf.function, 2 threads"
    mixed = SplitGroup(FLOWERS["fingerprint"], [
        candidate("a", "fast", 0.8, 2.0, 1, True),
        candidate("b", "other threads", 0.85, 1.5, 2, True, timing="tflite_float32, LiteRT XNNPACK, 2 threads"),
        candidate("c", "old", 0.9, 9.0, 3, True, timing=keras),
        candidate("d", "fast too", 0.7, 2.1, 4, False),
    ])
    write_report([mixed], tmp_path, "exp")
    table = (tmp_path / "runs.md").read_text()
    assert (f"**Latency was measured in 3 different ways here** (2 runs: {SHIPPED}; "
            f"1 run: tflite_float32, LiteRT XNNPACK, 2 threads; 1 run: {keras})") in table
    assert draw([mixed], "exp").axes[0].get_xlabel() == "latency, batch 1, median (ms): timed in different ways (runs.md)"
    timings = [row["timing"] for row in csv.DictReader((tmp_path / "runs.csv").open())]
    assert timings == [SHIPPED, "tflite_float32, LiteRT XNNPACK, 2 threads", keras, SHIPPED]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> mlflow.MlflowClient:
    """One SQLite store for the module; each test makes its own experiment in it."""
    root = tmp_path_factory.mktemp("mlflow")
    return mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")


def new_experiment(client: mlflow.MlflowClient, tmp_path: Path) -> str:
    """A fresh experiment whose artifacts stay in tmp_path; returns its name."""
    name = tmp_path.name
    client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    return name


def log_run(
    client: mlflow.MlflowClient,
    experiment: str,
    name: str,
    val: float,
    latency: float,
    data: dict[str, str] | None = None,
    kind: str = "run",
    parent: str | None = None,
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> str:
    """A run as a job logs it: data params, accuracy, latency and size; returns its id."""
    tags = {"kind": kind, **({MLFLOW_PARENT_RUN_ID: parent} if parent else {}), **(tags or {})}
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {"final_val_accuracy": val, "latency_median_ms": latency, "params": 1e6} if kind != "search" else {}
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
                     params=[Param(f"data.{key}", value) for key, value in (data or {}).items()])
    client.set_terminated(run_id, status)
    return run_id


def by_name(groups: list[SplitGroup]) -> dict[str, Candidate]:
    return {c.name: c for group in groups for c in group.candidates}


class PagedClient(mlflow.MlflowClient):
    """A store that answers at most `limit` runs per request, as a tracking server caps its pages."""

    def __init__(self, tracking_uri: str, limit: int) -> None:
        super().__init__(tracking_uri)
        self.limit = limit
        self.requests = 0

    def search_runs(self, *args, max_results: int = 1000, **kwargs) -> PagedList:
        self.requests += 1
        return super().search_runs(*args, max_results=min(max_results, self.limit), **kwargs)


def test_every_page_of_runs_is_read(client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = new_experiment(client, tmp_path)
    for index in range(25):
        log_run(client, experiment, f"run {index}", 0.5 + index / 100, 10.0 - index / 10, FLOWERS)
    paged = PagedClient(client.tracking_uri, limit=10)
    groups = collect(paged, experiment)
    assert sorted(by_name(groups)) == sorted(f"run {index}" for index in range(25))
    assert paged.requests == 3


def test_each_data_split_has_its_own_front(client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = new_experiment(client, tmp_path)
    log_run(client, experiment, "flowers fast", 0.80, 10.0, FLOWERS)
    log_run(client, experiment, "flowers slow", 0.70, 20.0, FLOWERS)  # beaten by "flowers fast"
    log_run(client, experiment, "digits", 0.95, 5.0, DIGITS)  # better than both, on other data
    groups = collect(client, experiment)
    assert [(g.title, [c.name for c in g.candidates]) for g in groups] == [
        ("digits (split d2d2d2d2d2d2d2d2)", ["digits"]),
        ("flowers (split f1f1f1f1f1f1f1f1)", ["flowers fast", "flowers slow"]),
    ]
    runs = by_name(groups)
    assert runs["flowers fast"].pareto and runs["flowers fast"].pareto_with_size  # dominated only by the other split
    assert not runs["flowers slow"].pareto and runs["digits"].pareto
    assert (runs["flowers fast"].data_root, runs["flowers fast"].number, runs["flowers slow"].number) == ("/data/flowers", 1, 2)


def test_what_each_run_timed_comes_from_its_tag(client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = new_experiment(client, tmp_path)
    keras_tags = {"latency.method": "keras model, tf.function", "latency.measured_threads": "2"}
    log_run(client, experiment, "shipped", 0.8, 1.0, FLOWERS, tags={"latency.method": SHIPPED})
    log_run(client, experiment, "before latency.format", 0.9, 9.0, FLOWERS, tags=keras_tags)
    log_run(client, experiment, "old run timed again", 0.85, 1.1, FLOWERS, tags={**keras_tags, "latency.method": SHIPPED})
    log_run(client, experiment, "untagged", 0.7, 3.0, FLOWERS)
    runs = by_name(collect(client, experiment))
    assert {name: c.timing for name, c in runs.items()} == {
        "shipped": SHIPPED,
        "before latency.format": "keras model, tf.function, 2 threads",
        "old run timed again": SHIPPED,
        "untagged": "not recorded",
    }


def test_trials_take_the_data_split_of_their_search(client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = new_experiment(client, tmp_path)
    # a search stopped after two trials: the trials finished, the search did not
    search = log_run(client, experiment, "search", 0, 0, DIGITS, kind="search", status="KILLED")
    log_run(client, experiment, "trial 0", 0.6, 3.0, kind="trial", parent=search)
    log_run(client, experiment, "trial 1", 0.7, 4.0, kind="trial", parent=search)
    log_run(client, experiment, "flowers", 0.9, 1.0, FLOWERS)
    log_run(client, experiment, "unrecorded", 0.99, 0.5)  # no data split anywhere in its line
    groups = collect(client, experiment)
    assert [(g.fingerprint, sorted(c.name for c in g.candidates)) for g in groups] == [
        (DIGITS["fingerprint"], ["trial 0", "trial 1"]),
        (FLOWERS["fingerprint"], ["flowers"]),
        ("", ["unrecorded"]),
    ]
    assert groups[-1].title == "unknown data"
    assert all(c.pareto and c.data_name == "digits" for c in groups[0].candidates)


def test_command_line_report_and_fingerprint_filter(client: mlflow.MlflowClient, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    experiment = new_experiment(client, tmp_path)
    log_run(client, experiment, "mobilenet_v3_small a1.0 224px flowers", 0.80, 10.0, FLOWERS)
    log_run(client, experiment, "mobilenet_v2 a0.35 224px digits", 0.95, 5.0, DIGITS)
    uri = client.tracking_uri
    report.main([experiment, "--tracking-uri", uri, "--out", str(tmp_path / "all")])
    markdown = (tmp_path / "all" / "runs.md").read_text()
    assert "## digits (split d2d2d2d2d2d2d2d2)" in markdown and "## flowers (split f1f1f1f1f1f1f1f1)" in markdown
    assert "| 1 | mobilenet_v3_small a1.0 224px flowers | run | 0.800 |" in markdown
    assert markdown in capsys.readouterr().out

    report.main([experiment, "--tracking-uri", uri, "--fingerprint", FLOWERS["fingerprint"], "--out", str(tmp_path / "one")])
    with (tmp_path / "one" / "runs.csv").open() as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == ["mobilenet_v3_small a1.0 224px flowers"]
    assert "digits" not in (tmp_path / "one" / "runs.md").read_text()
    reports = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.kind = 'report'")
    assert sorted(run.data.tags.get("fingerprint", "") for run in reports) == ["", FLOWERS["fingerprint"]]
    assert all(run.info.status == "FINISHED" for run in reports)
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id)} == {"runs.csv", "runs.md", "pareto.png"}

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        report.main([experiment, "--tracking-uri", uri, "--fingerprint", "0000", "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no finished run on the data split 0000" in error
    assert "digits (split d2d2d2d2d2d2d2d2)" in error and not (tmp_path / "none").exists()
