"""`mode=tune`: Keras-Tuner search over alpha, dropout (and more), with accuracy AND latency per trial."""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import mlflow
from omegaconf import DictConfig, OmegaConf

from finetune import cost, feature_cache, interrupts, search_cluster, tracking, trial_latency, trial_memory
from finetune.backbone_search import trial_backbone
from finetune.model import build_classifier
from finetune.export import calibration_images
from finetune.model_files import ModelFiles
from finetune.run import PreparedData, latency_metrics, latency_tags, prepare_data, run_job, seed_everything
from finetune.runfolder import Manifest
from finetune.shipped import model_latencies
from finetune.trainer import RunState, train_two_phases

OBJECTIVE = kt.Objective("val_accuracy", direction="max")
TRIAL_PARAMS = ("backbone.name", "backbone.input_size", "latency.format", "latency.threads", "latency.keras_threads")


class FinetuneHyperModel(kt.HyperModel):
    """The search space from `tuner.*`, over the project's own classifier builder."""

    def __init__(self, cfg: DictConfig, num_classes: int) -> None:
        super().__init__(name="finetune")
        self.cfg = cfg
        self.num_classes = num_classes

    def trial_config(self, hp: kt.HyperParameters) -> DictConfig:
        """The run config of one trial (declares the hyperparameters on first use)."""
        cfg, search = copy.deepcopy(self.cfg), self.cfg.tuner
        cfg.backbone = trial_backbone(self.cfg, hp)  # the backbone, its alpha and input size
        cfg.head.dropout = hp.Float("dropout", search.dropout.min, search.dropout.max, step=search.dropout.step)
        for key, target in (("learning_rate", "train.phase1.learning_rate"),
                            ("unfreeze_blocks", "backbone.unfreeze_blocks")):
            if search[key]:
                OmegaConf.update(cfg, target, hp.Choice(key, list(search[key])))
        cfg.train.phase1.epochs = hp.values.get("tuner/epochs", search.phase1_epochs)  # hyperband sets the budget
        cfg.train.phase2.epochs = search.phase2_epochs
        return cfg

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        return build_classifier(self.trial_config(hp), self.num_classes)


class TwoPhaseTuner(kt.Tuner):
    """A trial is one short two-phase run: trained, timed, and recorded as a nested MLflow run."""

    def __init__(self, cfg: DictConfig, data: PreparedData, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.data = data
        self.parent_run_id: str | None = None  # the search's MLflow run; a worker's is the chief's (search_cluster)
        self.latencies = trial_latency.TrialLatencies()  # each inference graph timed once (trial_latency)

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        interrupts.check()
        keras.backend.clear_session()  # the previous trial's model and graphs go (see trial_memory)
        hp = trial.hyperparameters
        trial_cfg = self.hypermodel.trial_config(hp)
        seed_everything(trial_cfg.seed, trial_cfg.deterministic)
        model = self.hypermodel.build(hp)
        trial_dir = Path(self.get_trial_dir(trial.trial_id))
        trial_tags = {"trial_id": trial.trial_id, "kind": "trial", "tuner_id": self.tuner_id}
        with tracking.tracked_run(self.cfg.mlflow, None, trial_tags, nested=True, parent_run_id=self.parent_run_id,
                                  run_name=f"{tracking.run_label(trial_cfg)} trial {trial.trial_id}"):
            mlflow.log_params({f"hp.{k}": v for k, v in hp.values.items()})
            mlflow.log_params({key: OmegaConf.select(trial_cfg, key) for key in TRIAL_PARAMS})
            feeds = self.data.feeds(trial_cfg, model, Path(self.project_dir).parent)  # one cache folder for all trials
            with trial_memory.released_training_graphs():  # with clear_session, memory stays flat (keras-tuner#395)
                phases = train_two_phases(model, trial_cfg, feeds, trial_dir, RunState(trial_dir / "state.json"))
            timed = self.latencies.measure(trial_latency.graph_key(trial_cfg, self.data.num_classes), trial.trial_id,
                                           partial(self._measure_latencies, model, trial_cfg))
            shipped, keras_figure = timed.shipped, timed.keras_figure
            budget = self.cfg.tuner.max_latency_ms
            metrics = {
                "val_accuracy": max(result.best_val_accuracy for result in phases.values()),
                **latency_metrics(shipped, keras_figure),
                "params": float(model.count_params()),
                "macs": float(cost.count_macs(model)),
                "within_latency_budget": float(budget is None or shipped.median_ms <= budget),
            }
            # per-epoch val_accuracy is already logged by step; the kept (best) value goes under its own name
            mlflow.log_metrics({("final_val_accuracy" if k == "val_accuracy" else k): v for k, v in metrics.items()})
            reused = trial_latency.reuse_tag(timed, trial.trial_id)
            mlflow.set_tags({**latency_tags(shipped, keras_figure), **reused})
        print(f"Trial {trial.trial_id}: val_accuracy {metrics['val_accuracy']:.3f}, "
              f"latency {shipped.median_ms:.2f} ms ({shipped.describe()}; reused: {reused['latency_reused']}), "
              f"{hp.values}", flush=True)
        return metrics

    def _measure_latencies(self, model: keras.Model, trial_cfg: DictConfig) -> tuple[cost.Latency, cost.Latency]:
        """The trial's model converted to its headline TFLite file and timed, with the Keras model's figure."""
        with ModelFiles(model, None, partial(calibration_images, trial_cfg, self.data.splits)) as files:
            return model_latencies(files, trial_cfg)


def make_oracle(search: DictConfig, seed: int) -> kt.Oracle:
    """RandomSearch, BayesianOptimization or Hyperband, by tuner.algorithm."""
    if search.algorithm == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(OBJECTIVE, max_trials=search.max_trials, seed=seed)
    if search.algorithm == "hyperband":
        return kt.oracles.HyperbandOracle(OBJECTIVE, max_epochs=search.max_epochs, factor=3, seed=seed)
    return kt.oracles.RandomSearchOracle(OBJECTIVE, max_trials=search.max_trials, seed=seed)


def best_within_budget(trials: list[kt.engine.trial.Trial], budget_ms: float | None) -> kt.engine.trial.Trial | None:
    """The most accurate finished trial whose median latency is within the budget (trials come best first)."""
    for trial in trials:
        latency = trial.metrics.get_last_value("latency_median_ms")
        if latency is not None and (budget_ms is None or latency <= budget_ms):
            return trial
    return None


def tune_job(cfg: DictConfig, run_dir: Path, tags: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Search (or resume the search) in run_dir, then retrain and test the best trial within the budget."""
    manifest = Manifest(run_dir)
    manifest.start("tune", cfg)
    data = prepare_data(cfg)
    manifest.check_fingerprint(data.info["fingerprint"], data.folder.source.location)
    data.write_lists(run_dir)
    hypermodel = FinetuneHyperModel(cfg, data.num_classes)
    tuner = TwoPhaseTuner(
        cfg,
        data,
        oracle=make_oracle(cfg.tuner, cfg.seed),
        hypermodel=hypermodel,
        directory=str(run_dir),
        project_name="tuner",
        overwrite=False,  # an interrupted search continues; finished trials are not trained again
    )
    role = search_cluster.role()
    if role == "worker":
        return _search_as_worker(cfg, tuner)
    search_tags = {**(tags or {}), "kind": "search", "run_dir": str(run_dir.resolve())}
    with tracking.job_run(cfg, manifest, search_tags, data.params(), run_name=f"search {tracking.run_label(cfg)}") as (run, _):
        tuner.parent_run_id = run.info.run_id
        if role == "chief":
            search_cluster.publish_search_run(run.info.experiment_id, run.info.run_id)
            search_cluster.serve_oracle(tuner)
        else:
            tuner.search()
        finished = tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials))
        best = best_within_budget(finished, cfg.tuner.max_latency_ms)
        mlflow.log_metrics({"trials": len(finished)})
        if best is None:
            feature_cache.remove_files(run_dir)
            print(f"No trial met tuner.max_latency_ms={cfg.tuner.max_latency_ms}; nothing retrained.")
            mlflow.set_tag("best_trial", "none within the latency budget")
            return None
        mlflow.set_tag("best_trial", best.trial_id)
        mlflow.log_params({f"best.{k}": v for k, v in best.hyperparameters.values.items()})
        best_cfg = hypermodel.trial_config(best.hyperparameters)
        best_cfg.train.phase1.epochs = cfg.train.phase1.epochs  # the full schedule
        best_cfg.train.phase2.epochs = cfg.train.phase2.epochs
        best_cfg.mlflow.run_name = f"{tracking.run_label(best_cfg)} best (trial {best.trial_id})"
        print(f"Best trial {best.trial_id} ({best.hyperparameters.values}); retraining with the full schedule.")
        best_dir = _best_dir(run_dir)
        _hand_over_caches(run_dir, best_dir)
        metrics = run_job(best_cfg, best_dir, tags={"kind": "best", "best_trial": best.trial_id}, data=data,
                          nested=True)
        mlflow.log_metrics({f"best.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _search_as_worker(cfg: DictConfig, tuner: TwoPhaseTuner) -> None:
    """A worker of a distributed search: run the chief's trials under the chief's search run, until none is left."""
    tuner.parent_run_id = search_cluster.chief_search_run(cfg.mlflow, tuner.oracle)
    tuner.search()
    feature_cache.remove_files(Path(tuner.project_dir).parent)
    print(f"{tuner.tuner_id}: the chief's oracle has no trial left; the chief retrains the best.", flush=True)


def _hand_over_caches(run_dir: Path, best_dir: Path) -> None:
    """The search's feature-cache files become the retrain's (whose train stage deletes them once trained).

    In this process the retrain takes the best trial's cache from memory; the files serve a retrain resumed in
    a new process (after a kill), which reads them instead of filling them again."""
    searched, retrain = run_dir / feature_cache.CACHE_DIR, best_dir / feature_cache.CACHE_DIR
    if searched.exists() and not retrain.exists():
        os.replace(searched, retrain)
    feature_cache.remove_files(run_dir)


def _best_dir(run_dir: Path) -> Path:
    path = run_dir / "best"
    path.mkdir(exist_ok=True)
    return path
