"""A Keras-Tuner search over several processes or machines, with Keras-Tuner's own mechanism.

Every process runs the same `mode=tune` command, each in a run folder of its own, with
KERASTUNER_TUNER_ID (`chief`, or a name of its own per worker), KERASTUNER_ORACLE_IP and
KERASTUNER_ORACLE_PORT (where the chief serves the oracle). The chief serves the oracle and runs no
trial; each worker asks it for trials until none is left; the chief then retrains the best.

One MLflow parent run: the chief's search run. Before it serves, the chief names that run in a tag of the
MLflow experiment keyed by the oracle's address; a worker reads the tag only once the oracle has answered
it, so it finds the run of the chief that is serving, never one left by an earlier search on the same
address, and needs no shared folder. Every process must therefore use the same MLflow store and experiment.

Pure Python at import (the CLI checks the environment before Hydra starts).
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

from finetune import interrupts
from finetune.config import UsageError

if TYPE_CHECKING:
    import keras_tuner as kt
    from omegaconf import DictConfig

TUNER_ID, ORACLE_IP, ORACLE_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
ENVIRONMENT = (TUNER_ID, ORACLE_IP, ORACLE_PORT)
SEARCH_TAG_PREFIX = "finetune.search_run."  # + the oracle's address: the chief's search run id


def role() -> str:
    """`single` (no KERASTUNER_* variables), `chief` (a tuner id containing "chief", as Keras-Tuner reads it) or `worker`."""
    if not os.environ.get(ORACLE_IP):
        return "single"
    return "chief" if "chief" in os.environ.get(TUNER_ID, "") else "worker"


def check_environment() -> None:
    """All three KERASTUNER_* variables or none, and a port number (Keras-Tuner would stop with a traceback)."""
    given = [name for name in ENVIRONMENT if os.environ.get(name)]
    if given and len(given) < len(ENVIRONMENT):
        missing = ", ".join(name for name in ENVIRONMENT if name not in given)
        raise UsageError(f"a distributed search needs {', '.join(ENVIRONMENT)}; {missing} is not set")
    port = os.environ.get(ORACLE_PORT, "1")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{ORACLE_PORT}={port} must be a port number (1..65535)")


def oracle_address() -> str:
    return f"{os.environ[ORACLE_IP]}:{os.environ[ORACLE_PORT]}"


def search_tag() -> str:
    """The experiment tag that names the chief's search run: one per oracle address."""
    return SEARCH_TAG_PREFIX + re.sub(r"[^\w.-]", "_", oracle_address())


def publish_search_run(experiment_id: str, run_id: str) -> None:
    """The chief, before it serves: name its search run for the workers of this oracle."""
    from mlflow import MlflowClient

    MlflowClient().set_experiment_tag(experiment_id, search_tag(), run_id)


def chief_search_run(mlflow_cfg: DictConfig, oracle: Any) -> str:
    """A worker: wait until the chief serves the oracle, then read the search run it published."""
    from mlflow import MlflowClient

    from finetune import tracking

    print(f"Waiting for the chief's oracle at {oracle_address()} ...", flush=True)
    oracle.get_space()  # Keras-Tuner's client waits (up to an hour) until the chief serves
    experiment_id = tracking.setup(mlflow_cfg)
    run_id = MlflowClient().get_experiment(experiment_id).tags.get(search_tag())
    if run_id is None:
        raise UsageError(f"the chief at {oracle_address()} has no search run in MLflow experiment "
                         f"{mlflow_cfg.experiment} at {mlflow_cfg.tracking_uri}; give every process of the search "
                         "the same mlflow.tracking_uri and mlflow.experiment")
    return run_id


def serve_oracle(tuner: kt.Tuner, poll_seconds: float = 1.0) -> None:
    """The chief's part of the search: serve the oracle until every trial has ended and every worker was told.

    Keras-Tuner's own chief loop (oracle_chief.start_server) with these changes: Ctrl-C and `kill` stop it
    (interrupts.check, once a second); it frees the port and saves the oracle on the way out; it notices the
    end every second rather than every 20.
    """
    import grpc
    from concurrent import futures
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    tuner.save()  # a restarted chief reloads the search from here
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(tuner.oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(oracle_address())
    except RuntimeError as error:
        raise UsageError(f"the chief cannot serve the oracle at {oracle_address()} ({error}); "
                         f"is another search using {ORACLE_PORT}={os.environ[ORACLE_PORT]}?") from None
    server.start()
    print(f"Serving the search's oracle at {oracle_address()}; waiting for the workers' trials.", flush=True)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(tuner.oracle)):
            interrupts.check()
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=None)
        # Keras-Tuner saves the oracle as a trial ends but before it stops counting it as ongoing, and a reloaded
        # oracle retries the trials it counts as ongoing: without this save, a restarted chief reruns the last
        # finished trial. After server.stop no request changes the oracle.
        tuner.oracle.save()
