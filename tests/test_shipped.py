"""A run's headline latency is that of the shipped TFLite file (converted as the export converts it) run by LiteRT
at latency.threads, not the Keras model's; the Keras figure stays under its own name."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from omegaconf import OmegaConf

from conftest import litert_median_ms
from finetune import shipped
from finetune.bundle import convert_tflite, write_saved_model
from finetune.config import compose
from finetune.cost import Latency
from finetune.model import build_classifier
from finetune.run import _Stages, latency_tags
from finetune.shipped import shipped_latency

SIZE = 32


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """The quick configuration's model: MobileNetV3Small at 32 px, random weights, 3 classes."""
    cfg = OmegaConf.create({
        "backbone": {"name": "mobilenet_v3_small", "alpha": 1.0, "minimalistic": False, "input_size": SIZE,
                     "unfreeze_blocks": 0, "weights": None},
        "head": {"pooling": "avg", "dropout": 0.2, "hidden_units": [], "class_weight": None},
    })
    keras.utils.set_random_seed(0)
    return build_classifier(cfg, 3)


@pytest.fixture
def timed_files(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes of every file shipped_latency times, kept before its temporary folder goes."""
    kept: list[bytes] = []
    real = shipped.measure_tflite_latency

    def keep(path: Path, *args: object):
        kept.append(path.read_bytes())
        return real(path, *args)

    monkeypatch.setattr(shipped, "measure_tflite_latency", keep)
    return kept


def exported_float32(model: keras.Model, folder: Path) -> Path:
    """The tflite_float32 file the export writes (its full SavedModel, then the converter)."""
    write_saved_model(model, folder / "saved_model", top_k=3)
    path = folder / "model_float32.tflite"
    path.write_bytes(convert_tflite(folder / "saved_model", "tflite_float32", None))
    return path


def outputs_and_ops(model_file: bytes) -> tuple[np.ndarray, list[tuple]]:
    """What a TFLite model computes for one image, and its operators (tensor names aside)."""
    interpreter = Interpreter(model_content=model_file)
    interpreter.allocate_tensors()
    given = interpreter.get_input_details()[0]
    interpreter.set_tensor(given["index"], np.random.default_rng(1).integers(0, 256, given["shape"]).astype(given["dtype"]))
    interpreter.invoke()
    ops = [(op["op_name"], len(op["inputs"]), len(op["outputs"])) for op in interpreter._get_ops_details()]
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), ops


def test_a_runs_headline_is_the_shipped_float_file_timed_by_litert(model: keras.Model, timed_files: list[bytes],
                                                                    tmp_path: Path) -> None:
    cfg = compose(["backbone=mobilenet_v3_small", "backbone.weights=null", f"backbone.input_size={SIZE}",
                   "latency.warmup=5", "latency.runs=30"])  # the default latency.format and threads
    model.save(tmp_path / "model.keras")
    results: dict = {}
    _Stages(cfg, tmp_path, None, None, None, results).time()  # the run's `time` stage (no data needed for float)
    protocol = results["latency_protocol"]
    assert (protocol["method"], protocol["threads"], protocol["runs"]) == ("tflite_float32, LiteRT XNNPACK", 1, 30)
    assert results["keras_latency_protocol"]["method"] == "keras model, tf.function"
    tags = latency_tags(*(Latency(**results[key]) for key in ("latency_protocol", "keras_latency_protocol")))
    assert tags["latency.method"] == "tflite_float32, LiteRT XNNPACK, 1 thread"

    exported = exported_float32(model, tmp_path / "export")
    timed_outputs, timed_ops = outputs_and_ops(timed_files[0])
    exported_outputs, exported_ops = outputs_and_ops(exported.read_bytes())
    assert timed_ops == exported_ops  # the file timed is the model the export ships
    np.testing.assert_array_equal(timed_outputs, exported_outputs)

    headline, keras_figure = results["latency_median_ms"], results["keras_latency_median_ms"]
    direct = litert_median_ms(exported, threads=1)
    assert direct / 3 < headline < direct * 3, (headline, direct)
    # the Keras model through tf.function pays TensorFlow's per-op overhead: many times the LiteRT figure here
    assert headline * 3 < keras_figure, (headline, keras_figure)
    assert results["latency_p90_ms"] >= headline and results["latency_exclusive"] in (0.0, 1.0)


def test_int8_is_timed_as_the_calibrated_integer_file(model: keras.Model, timed_files: list[bytes]) -> None:
    calibration = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype("uint8")
    asked = []
    latency_cfg = OmegaConf.create({"format": "tflite_int8", "threads": 1, "keras_threads": None, "warmup": 2, "runs": 5})
    latency = shipped_latency(model, latency_cfg, lambda: asked.append(1) or calibration)
    assert asked == [1] and latency.method == "tflite_int8, LiteRT XNNPACK"
    details = Interpreter(model_content=timed_files[0]).get_input_details()[0]
    assert (details["dtype"], details["quantization"]) == (np.uint8, (1.0, 0))  # the export's raw-pixel int8 model
