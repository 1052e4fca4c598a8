"""What a model costs: parameters, multiply-adds counted from its layers, and measured CPU latency.

One protocol for every timing: batch 1, `warmup` untimed calls, then `runs` timed calls; median and p90.
A TFLite file is run by the LiteRT interpreter (XNNPACK, its default CPU delegate) at a given thread
count; a Keras model through a compiled tf.function. Timings take turns machine-wide (a lock file in the
system temp folder), and each says whether it had the machine to itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import psutil
import tensorflow as tf
from filelock import FileLock, Timeout

TIMING_LOCK_FILE = "finetune-timing.lock"  # one per machine: every finetune process on it times in turn
TIMING_LOCK_TIMEOUT_S = 600.0  # a timing that waited this long runs anyway, and says it was not exclusive
QUIET_BELOW_CORES = 0.25  # exclusive: other processes kept less than this much of one core busy meanwhile
OBSERVE_AT_LEAST_S = 0.5  # the other processes' load is read over at least this long (the CPU clock ticks at 10 ms)


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
    method: str  # what ran: "keras model, tf.function", "tflite_int8, LiteRT XNNPACK", ...
    exclusive: bool  # had the timing lock, and other processes kept under QUIET_BELOW_CORES busy meanwhile
    other_cores: float  # cores other processes on the machine kept busy while it timed
    device: str = "CPU"  # where it ran: LiteRT's XNNPACK is a CPU delegate; a Keras model runs on TensorFlow's first GPU if any

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)

    def describe(self) -> str:
        """What was timed and how: "tflite_float32, LiteRT XNNPACK, 1 thread"."""
        return f"{self.method}, {threads_text(self.threads)}"


def threads_text(threads: int) -> str:
    """A thread count in words: 1 thread, 2 threads."""
    return f"{threads} thread{'' if threads == 1 else 's'}"


def intra_op_threads() -> int:
    """Threads TensorFlow uses inside one op (0 in its config means one per core)."""
    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


def timing_lock_path() -> Path:
    """The machine's timing lock: the same file for every run, sweep job and user on this machine."""
    return Path(tempfile.gettempdir()) / TIMING_LOCK_FILE


@contextlib.contextmanager
def machine_turn(timeout: float) -> Iterator[bool]:
    """Wait for this machine's timing turn; yields whether it got it (not within `timeout` s, or no usable lock file)."""
    lock = FileLock(timing_lock_path(), timeout=timeout, mode=0o666)
    try:
        lock.acquire()
    except (Timeout, OSError):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds this process has used), both since boot."""
    machine = psutil.cpu_times()._asdict()
    total = sum(machine.values()) - machine.get("guest", 0) - machine.get("guest_nice", 0)  # guest time is in user/nice
    own = psutil.Process().cpu_times()
    return total - machine["idle"] - machine.get("iowait", 0), own.user + own.system


class OtherLoad:
    """Context manager: afterwards `cores` holds the cores other processes kept busy while the block ran.

    Read over at least OBSERVE_AT_LEAST_S (a shorter block is followed by a wait), so clock ticks do not decide.
    """

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._start, (self._machine, self._own) = time.perf_counter(), _busy_cpu_seconds()
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(max(0.0, OBSERVE_AT_LEAST_S - (time.perf_counter() - self._start)))
        machine, own = _busy_cpu_seconds()
        others = (machine - self._machine) - (own - self._own)
        self.cores = max(0.0, others / (time.perf_counter() - self._start))


def keras_device() -> str:
    """Where TensorFlow runs a Keras model unless told otherwise: its first GPU, else the CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "CPU"


def time_calls(call: Callable[[], object], warmup: int, runs: int, threads: int, method: str,
               device: str = "CPU") -> Latency:
    """Median and p90 wall time of `call` after `warmup` untimed calls, in this machine's timing turn."""
    with machine_turn(TIMING_LOCK_TIMEOUT_S) as turn, OtherLoad() as others:
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
        exclusive=turn and others.cores < QUIET_BELOW_CORES,
        other_cores=others.cores,
        device=device,
    )


def measure_tflite_latency(path: Path, fmt: str, threads: int, warmup: int = 10, runs: int = 50) -> Latency:
    """Single-image inference of a TFLite file by the LiteRT interpreter (XNNPACK) with `threads` threads."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    given, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    image = np.random.default_rng(0).uniform(0, 255, given["shape"]).astype(given["dtype"])

    def call() -> np.ndarray:
        interpreter.set_tensor(given["index"], image)
        interpreter.invoke()
        return interpreter.get_tensor(output["index"])

    return time_calls(call, warmup, runs, threads, f"{fmt}, LiteRT XNNPACK")


def measure_latency(model: keras.Model, warmup: int = 10, runs: int = 50) -> Latency:
    """Single-image inference of a Keras model through a compiled tf.function, with TensorFlow's threads."""
    size = model.input_shape[1:]
    predict = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((1, *size), tf.float32)])
    image = tf.random.stateless_uniform((1, *size), seed=(0, 0), maxval=255.0)
    return time_calls(lambda: predict(image).numpy(), warmup, runs, intra_op_threads(), "keras model, tf.function",
                      keras_device())


def measure_keras_latency(model: keras.Model, warmup: int, runs: int, threads: int | None) -> Latency:
    """measure_latency with `threads` intra-op threads (None: TensorFlow's default, one per core).

    TensorFlow fixes its thread count once per process, so a set count is timed in a fresh process.
    """
    if threads is None:
        return measure_latency(model, warmup, runs)
    with tempfile.TemporaryDirectory(prefix="finetune-keras-latency-") as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        command = [sys.executable, "-m", "finetune.cost", str(path), str(warmup), str(runs), str(threads)]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"timing the Keras model with {threads} threads failed: {done.stderr.strip()[-2000:]}")
    return Latency(**json.loads(done.stdout.strip().splitlines()[-1]))


def _time_saved_keras_model(path: str, warmup: str, runs: str, threads: str) -> None:
    """The fresh process of measure_keras_latency: set the threads, load, time, print the Latency as JSON."""
    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    print(json.dumps(measure_latency(model, int(warmup), int(runs)).as_dict()))


if __name__ == "__main__":
    _time_saved_keras_model(*sys.argv[1:])
