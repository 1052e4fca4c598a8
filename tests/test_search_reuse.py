"""A search reuses what does not change between trials: the latency of an inference graph (timed once), and the
feature cache, which the best trial's retrain takes over (in process, or from its files after a kill)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_WEIGHTS, quick_overrides
from finetune import feature_cache, tuning
from finetune.config import compose
from finetune.run import prepare_data
from finetune.trial_latency import graph_key
from finetune.tuning import FinetuneHyperModel, TwoPhaseTuner, make_oracle, tune_job

V3_SMALL = SHARED_WEIGHTS / "mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5"


def search_cfg(data: Path, folder: Path, *extra: str):
    return compose(quick_overrides(
        data, folder / "search", "mode=tune", "tuner.phase1_epochs=1", "tuner.phase2_epochs=0",
        f"data.cache_dir={folder / 'cache'}", f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
        f"mlflow.artifact_location={folder / 'artifacts'}", *extra))


def test_the_graph_key_is_what_the_exported_graph_and_its_timing_depend_on(tiny_images: Path) -> None:
    base = ("backbone=mobilenet_v2", "backbone.alpha=0.35")
    key = graph_key(compose([*base]), 5)
    training_only = ("head.dropout=0.5", "train.phase1.learning_rate=0.1", "train.phase2.learning_rate=0.1",
                     "backbone.unfreeze_blocks=2", "train.phase1.epochs=3", "train.feature_cache=true", "seed=7")
    for change in training_only:
        assert graph_key(compose([*base, change]), 5) == key, change
    in_the_graph = ("backbone.alpha=1.0", "backbone.input_size=160", "head.pooling=max", "head.hidden_units=[64]",
                    "backbone=mobilenet_v3_small", "latency.format=tflite_int8", "latency.threads=2",
                    "latency.runs=9", "weights_dir=/elsewhere")
    for change in in_the_graph:
        assert graph_key(compose([*base, change]), 5) != key, change
    assert graph_key(compose([*base]), 4) != key  # the classes


def test_trials_of_one_graph_are_timed_once_and_say_whose_figure_they_took(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = search_cfg(tiny_images, tmp_path, "tuner.max_trials=2", "tuner.alpha=[1.0]")  # only dropout varies
    timed = []
    measure = tuning.model_latencies

    def counted(files, trial_cfg):
        timed.append(trial_cfg.head.dropout)
        return measure(files, trial_cfg)

    monkeypatch.setattr(tuning, "model_latencies", counted)
    data = prepare_data(cfg)
    tuner = TwoPhaseTuner(cfg, data, oracle=make_oracle(cfg.tuner, cfg.seed),
                          hypermodel=FinetuneHyperModel(cfg, data.num_classes), directory=str(tmp_path),
                          project_name="tuner")
    tuner.search()
    assert len(tuner.oracle.trials) == 2 and len(timed) == 1
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    trials = {run.data.tags["trial_id"]: run.data for run in runs}
    first = min(trials)
    assert trials[first].tags["latency_reused"] == "no"
    for trial_id, run in trials.items():
        if trial_id != first:
            assert run.tags["latency_reused"] == f"from trial {first}"
            assert run.metrics["latency_median_ms"] == trials[first].metrics["latency_median_ms"]
            assert run.tags["latency.method"] == trials[first].tags["latency.method"]


def runs_of_kind(cfg, kind: str) -> list:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([experiment.experiment_id], f"tags.kind = '{kind}'")


@pytest.mark.slow  # a search and a full retrain in process: ~50 s, the default tier's slowest test
def test_a_retrain_resumed_after_a_kill_reads_the_search_cache_files_it_took_over(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = search_cfg(tiny_images, tmp_path, "tuner.max_trials=1", "tuner.alpha=[1.0]", "train.feature_cache=true",
                     f"backbone.weights={V3_SMALL}", "train.feature_views=2", "tuner.phase2_epochs=1")
    run_dir = tmp_path / "search"
    run_dir.mkdir()  # as Hydra makes it
    retrain = tuning.run_job

    def killed_as_the_retrain_starts(*args, **kwargs):
        raise KeyboardInterrupt

    feature_cache._IN_PROCESS.clear()
    monkeypatch.setattr(tuning, "run_job", killed_as_the_retrain_starts)
    with pytest.raises(KeyboardInterrupt):
        tune_job(cfg, run_dir)
    handed_over = list((run_dir / "best" / feature_cache.CACHE_DIR).glob("*/train_view1_pooled.npy"))
    assert len(handed_over) == 1 and not (run_dir / feature_cache.CACHE_DIR).exists()

    feature_cache._IN_PROCESS.clear()  # a new process resumes the search: no trial left, the retrain runs
    monkeypatch.setattr(tuning, "run_job", retrain)
    tune_job(cfg, run_dir)
    best, = runs_of_kind(cfg, "best")
    assert best.data.tags["feature_cache_reused"] == "from files"
    assert not (run_dir / "best" / feature_cache.CACHE_DIR).exists()  # deleted once trained, as in any run
