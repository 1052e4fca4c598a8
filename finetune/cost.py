"""What a model costs: parameters, multiply-adds counted from its layers, and measured CPU latency."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf


def count_macs(model: keras.Model) -> int:
    """Multiply-adds of one forward pass at batch 1, counted from conv/depthwise/dense kernels.

    Each kernel weight is used once per output position: MACs = kernel size x output positions.
    Activations, BatchNorm, pooling and element-wise ops are not counted (as in the published tables).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        kernels = [getattr(layer, name, None) for name in ("kernel", "depthwise_kernel", "pointwise_kernel")]
        kernels = [k for k in kernels if k is not None]
        if not kernels:
            continue
        positions = math.prod(layer.output.shape[1:-1])
        if isinstance(layer, keras.layers.SeparableConv2D):  # pointwise runs at output resolution too
            total += positions * sum(math.prod(k.shape) for k in kernels)
        else:
            total += positions * math.prod(kernels[0].shape)
    return total


@dataclass
class Latency:
    """Batch-1 CPU latency and the protocol it was measured with (warm-up calls, timed runs, threads)."""

    median_ms: float
    p90_ms: float
    warmup: int
    runs: int
    threads: int
    method: str  # what ran: "keras model, tf.function", "tflite_int8, LiteRT + XNNPACK", ...

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def intra_op_threads() -> int:
    """Threads TensorFlow uses inside one op (0 in its config means one per core)."""
    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


def time_calls(call: Callable[[], object], warmup: int, runs: int, threads: int, method: str) -> Latency:
    """Median and p90 wall time of `call` after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return Latency(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        warmup=warmup,
        runs=runs,
        threads=threads,
        method=method,
    )


def measure_latency(model: keras.Model, warmup: int = 10, runs: int = 50) -> Latency:
    """Single-image inference of a Keras model through a compiled tf.function."""
    size = model.input_shape[1:]
    predict = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((1, *size), tf.float32)])
    image = tf.random.stateless_uniform((1, *size), seed=(0, 0), maxval=255.0)
    return time_calls(lambda: predict(image).numpy(), warmup, runs, intra_op_threads(), "keras model, tf.function")
