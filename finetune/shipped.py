"""The latency of what ships: the model converted to `latency.format`, timed by LiteRT.

Every run and every tuner trial is timed this way, whether or not its bundle keeps that format. The file is
made as the export makes it (a SavedModel, then the TFLite converter; int8 calibrated on the export's
training images; for int8 the plain recipe, not the one the export chooses on the validation split). In a
run it is the export's own file (`finetune.model_files`, made once for both stages); a trial's SavedModel
has only the endpoint the converter reads.
"""

from __future__ import annotations

from typing import Any

from finetune.cost import Latency, measure_keras_latency, measure_tflite_latency
from finetune.model_files import ModelFiles


def shipped_latency(files: ModelFiles, latency_cfg: Any) -> Latency:
    """Batch-1 latency of the model as a `latency.format` TFLite file run by LiteRT with `latency.threads` threads."""
    fmt = latency_cfg.format
    return measure_tflite_latency(files.tflite(fmt), fmt, latency_cfg.threads, latency_cfg.warmup, latency_cfg.runs)


def model_latencies(files: ModelFiles, cfg: Any) -> tuple[Latency, Latency]:
    """(the shipped file's latency, the Keras model's), measured as every run and every tuner trial measures them."""
    latency = cfg.latency
    shipped = shipped_latency(files, latency)
    return shipped, measure_keras_latency(files.model, latency.warmup, latency.runs, latency.keras_threads)
