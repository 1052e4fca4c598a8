"""The latency of what ships: the model converted to `latency.format` in a temporary folder, timed, deleted.

Every run and every tuner trial is timed this way, whether or not its bundle keeps that format. The file is
made as the export makes it (a SavedModel, then the TFLite converter; int8 calibrated on the export's
training images; for int8 the plain recipe, not the one the export chooses on the validation split), except
that the SavedModel has only the endpoint the converter reads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.bundle import convert_tflite, write_saved_model
from finetune.cost import Latency, measure_keras_latency, measure_tflite_latency


def shipped_latency(model: keras.Model, latency_cfg: Any, calibration: Callable[[], np.ndarray]) -> Latency:
    """Batch-1 latency of the model as a `latency.format` TFLite file run by LiteRT with `latency.threads` threads.

    calibration: gives the int8 calibration images; called only for tflite_int8.
    """
    fmt = latency_cfg.format
    with tempfile.TemporaryDirectory(prefix="finetune-latency-") as folder:
        saved_model, tflite = Path(folder) / "saved_model", Path(folder) / f"{fmt}.tflite"
        write_saved_model(model, saved_model, top_k=None)
        representative = calibration() if fmt == "tflite_int8" else None
        tflite.write_bytes(convert_tflite(saved_model, fmt, representative))
        return measure_tflite_latency(tflite, fmt, latency_cfg.threads, latency_cfg.warmup, latency_cfg.runs)


def model_latencies(model: keras.Model, cfg: Any, calibration: Callable[[], np.ndarray]) -> tuple[Latency, Latency]:
    """(the shipped file's latency, the Keras model's), measured as every run and every tuner trial measures them.

    calibration: gives the int8 calibration images (export.calibration_images); called only for tflite_int8.
    """
    latency = cfg.latency
    shipped = shipped_latency(model, latency, calibration)
    return shipped, measure_keras_latency(model, latency.warmup, latency.runs, latency.keras_threads)
