"""Parameter and multiply-add counts against the published tables; the latency protocol; timings take turns
machine-wide and say whether other processes were busy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest
from filelock import FileLock

from finetune import cost
from finetune.cost import count_macs, measure_keras_latency, measure_latency, time_calls, timing_lock_path


@pytest.mark.parametrize(
    ("constructor", "kwargs", "published_macs_m", "published_params_m"),
    [
        ("MobileNetV2", {"alpha": 1.0}, 300, 3.47),  # MobileNetV2 paper, table 3 / Keras docs
        ("MobileNetV2", {"alpha": 0.35}, 59, 1.66),
        ("MobileNetV3Large", {}, 217, 5.4),  # MobileNetV3 paper (v5), table 3
        ("MobileNetV3Small", {}, 56, 2.5),  # the paper's final table; its first version said 66M / 2.9M
        ("MobileNet", {"alpha": 1.0}, 569, 4.2),  # MobileNet paper, table 8
    ],
)
def test_counts_match_published_tables(constructor: str, kwargs: dict, published_macs_m: float, published_params_m: float) -> None:
    model = getattr(keras.applications, constructor)(weights=None, input_shape=(224, 224, 3), **kwargs)
    assert count_macs(model) / 1e6 == pytest.approx(published_macs_m, rel=0.02)
    assert model.count_params() / 1e6 == pytest.approx(published_params_m, rel=0.035)


def test_macs_of_hand_counted_model() -> None:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)  # 8*8 * 3*3*3*4 = 6912
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4 * 3*3*4 = 576
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 4*5 = 20
    assert count_macs(keras.Model(inputs, outputs)) == 6912 + 576 + 20


def test_latency_protocol_is_reported() -> None:
    model = keras.applications.MobileNetV3Small(weights=None, include_top=False, input_shape=(64, 64, 3))
    latency = measure_latency(model, warmup=2, runs=7)
    assert 0 < latency.median_ms <= latency.p90_ms
    assert (latency.warmup, latency.runs) == (2, 7)
    assert latency.threads >= 1
    assert latency.method == "keras model, tf.function" and latency.other_cores >= 0


@pytest.mark.slow
def test_keras_threads_are_those_asked_for() -> None:
    """TensorFlow takes its thread count once per process: a set count is timed in a fresh one."""
    model = keras.applications.MobileNetV3Small(weights=None, include_top=False, input_shape=(32, 32, 3))
    latency = measure_keras_latency(model, warmup=1, runs=3, threads=1)
    assert (latency.threads, latency.runs, latency.method) == (1, 3, "keras model, tf.function")
    assert 0 < latency.median_ms <= latency.p90_ms


# A timer process: ready, wait for the go, time 15 calls of 20 ms, print when its calls started and ended.
TIMER = """
import json, sys, time
from pathlib import Path
from finetune.cost import time_calls
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
calls = []
def call():
    calls.append(time.time())
    time.sleep(0.02)
time_calls(call, warmup=0, runs=15, threads=1, method="sleep")
print(json.dumps([calls[0], calls[-1] + 0.02]))
"""


def test_two_processes_take_turns_to_time(tmp_path: Path) -> None:
    go = tmp_path / "go"
    timers = [subprocess.Popen([sys.executable, "-c", TIMER, str(tmp_path / f"ready{i}"), str(go)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(t.poll() is None for t in timers), "a timer did not start"
        time.sleep(0.01)
    go.touch()  # both start timing at once: one has to wait for the other's turn
    spans = sorted(json.loads(t.communicate(timeout=120)[0].splitlines()[-1]) for t in timers)
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end, f"the timings overlapped: {spans}"


def test_a_timing_that_cannot_get_its_turn_runs_anyway_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "TIMING_LOCK_TIMEOUT_S", 0.2)
    held = FileLock(timing_lock_path())  # another timer, stuck
    with held:
        latency = time_calls(lambda: None, warmup=0, runs=3, threads=1, method="nothing")
    assert latency.runs == 3 and not latency.exclusive


def scripted_load(monkeypatch: pytest.MonkeyPatch, machine_busy_s: float, own_s: float) -> None:
    """The CPU clocks read by the timing: the machine busy for machine_busy_s, this process for own_s, in between."""
    readings = iter([(100.0, 10.0), (100.0 + machine_busy_s, 10.0 + own_s)])
    monkeypatch.setattr(cost, "_busy_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(cost, "OBSERVE_AT_LEAST_S", 1.0)


@pytest.mark.parametrize(("machine_busy_s", "own_s", "exclusive"), [(1.05, 1.0, True), (1.6, 1.0, False)])
def test_only_other_processes_busy_meanwhile_make_a_timing_not_exclusive(
    monkeypatch: pytest.MonkeyPatch, machine_busy_s: float, own_s: float, exclusive: bool
) -> None:
    scripted_load(monkeypatch, machine_busy_s, own_s)  # over ~1 s: others 0.05 or 0.6 cores; this process's own never count
    latency = time_calls(lambda: None, warmup=0, runs=3, threads=1, method="nothing")
    assert latency.exclusive is exclusive
    assert latency.other_cores == pytest.approx(machine_busy_s - own_s, rel=0.1)


def test_a_busy_process_beside_the_timing_makes_it_not_exclusive() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        latency = time_calls(lambda: time.sleep(0.01), warmup=0, runs=20, threads=1, method="sleep")
    finally:
        spinner.kill()
        spinner.wait()
    assert latency.other_cores > cost.QUIET_BELOW_CORES and not latency.exclusive
