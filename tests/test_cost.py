"""Parameter and multiply-add counts against the published tables; the latency protocol."""

from __future__ import annotations

import keras
import pytest

from finetune.cost import count_macs, measure_latency


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
