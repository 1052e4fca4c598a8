"""MLflow: one run per invocation that spans both phases, resumable, never left RUNNING on failure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from finetune.config import UsageError, flatten
from finetune.runfolder import Manifest

if TYPE_CHECKING:  # keras (TensorFlow) is imported only where a model is logged: `finetune report` stays quick
    import keras


DEFAULT_STORE = "sqlite:///experiments/mlflow.db"  # the default store, seen from the project folder


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a local SQLite store; None for any other store."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def require_store(tracking_uri: str) -> None:
    """Refuse a SQLite store that does not exist (MLflow would create an empty one)."""
    path = _sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise UsageError(f"no MLflow store at {path}; pass --tracking-uri")


def setup(mlflow_cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    Jobs started together on a new SQLite store (a parallel sweep) would race to create MLflow's tables
    and the experiment, so they take turns on a lock file beside the database.
    """
    mlflow.set_tracking_uri(mlflow_cfg.tracking_uri)
    path = _sqlite_path(mlflow_cfg.tracking_uri)
    if path is None:
        return _get_or_create_experiment(mlflow_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        return _get_or_create_experiment(mlflow_cfg)


def _get_or_create_experiment(mlflow_cfg: DictConfig) -> str:
    experiment = mlflow.get_experiment_by_name(mlflow_cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = mlflow_cfg.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    return mlflow.create_experiment(mlflow_cfg.experiment, artifact_location=location)


def run_label(cfg: DictConfig) -> str:
    """A run's name when mlflow.run_name is not set: what it is, e.g. `mobilenet_v2 a0.35 160px flower_photos`."""
    backbone, data = cfg.backbone, cfg.data
    alpha = f" a{float(backbone.alpha)}" if "alpha" in backbone else ""
    dataset = Path(str(data.path)).expanduser().name if data.get("path") else data.name
    return f"{backbone.name}{alpha} {backbone.input_size}px {dataset}"


@contextlib.contextmanager
def job_run(
    cfg: DictConfig,
    manifest: Manifest,
    tags: dict[str, str],
    params: dict[str, Any],
    nested: bool = False,
    run_name: str | None = None,
) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
    """The MLflow run of a run folder: re-opened when the manifest names one in this store and experiment,
    otherwise started (named after what it is) with the config and `params` logged; yields (run, started now)."""
    recorded = manifest.get("mlflow") or {}
    where = {"tracking_uri": cfg.mlflow.tracking_uri, "experiment": cfg.mlflow.experiment}
    run_id = recorded.get("run_id") if all(recorded.get(k) == v for k, v in where.items()) else None
    name = cfg.mlflow.run_name or run_name or run_label(cfg)
    with tracked_run(cfg.mlflow, run_id, tags, nested=nested, run_name=name) as run:
        if run_id is None:
            manifest.update(mlflow={**where, "run_id": run.info.run_id})
            mlflow.log_params({**flatten(cfg), **params})
        yield run, run_id is None


@contextlib.contextmanager
def tracked_run(
    mlflow_cfg: DictConfig, run_id: str | None, tags: dict[str, str], nested: bool = False, run_name: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or re-open, given run_id) the run; end it FINISHED, KILLED on interrupt, FAILED on error.

    parent_run_id: the run to nest under when it is not this process's active run (a search worker's trials).
    """
    experiment_id = setup(mlflow_cfg)
    run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, tags=tags, nested=nested,
                           parent_run_id=parent_run_id)
    try:
        yield run
    except KeyboardInterrupt:
        _end(run, "KILLED")
        raise
    except BaseException:
        _end(run, "FAILED")
        raise
    _end(run, "FINISHED")


def _end(run: mlflow.ActiveRun, status: str) -> None:
    """End this run (and any nested run still open inside it)."""
    while (active := mlflow.active_run()) is not None and active.info.run_id != run.info.run_id:
        mlflow.end_run(status=status)
    mlflow.end_run(status=status)


REGISTRY_ALIAS = "newest"


def log_keras_model(model: keras.Model, example: np.ndarray, registered_name: str | None) -> None:
    """Log the Keras model with its signature and an input example; optionally register it as "newest"."""
    import mlflow.tensorflow
    example = example.astype("float32")
    signature = mlflow.models.infer_signature(example, np.asarray(model(example, training=False)))
    # mlflow.tensorflow, not mlflow.keras: the latter fails with an input example (mlflow issue 16183)
    # Stating the requirements skips MLflow's inference, which reloads the model in a subprocess (~8 s).
    requirements = [f"{package}=={version(package)}" for package in ("tensorflow", "keras")]
    import keras

    keras.config.disable_interactive_logging()  # MLflow checks the input example with predict(): no progress bar
    try:
        info = mlflow.tensorflow.log_model(
            model, name="model", signature=signature, input_example=example, registered_model_name=registered_name,
            pip_requirements=requirements,
        )
    finally:
        keras.config.enable_interactive_logging()
    if registered_name and info.registered_model_version is not None:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, REGISTRY_ALIAS, str(info.registered_model_version))
