"""A run's headline latency is that of the shipped TFLite file (in a run that exports it, the bundle's own file) run
by LiteRT at latency.threads, not the Keras model's; the Keras figure stays under its own name. A run makes its
SavedModel and each TFLite file once, for both its `time` and `export` stages."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from omegaconf import OmegaConf

from conftest import litert_median_ms, quick_overrides
from finetune import bundle as bundle_module
from finetune import shipped
from finetune.artifacts import artifact_path
from finetune.bundle import convert_tflite, write_saved_model
from finetune.config import compose
from finetune.cost import Latency
from finetune.model import build_classifier
from finetune.model_files import ModelFiles
from finetune.run import _Stages, latency_tags, prepare_data
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
    with contextlib.closing(_Stages(cfg, tmp_path, None, None, SimpleNamespace(splits={}), results)) as stages:
        stages.time()  # the run's `time` stage (no data needed for float)
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
    with ModelFiles(model, None, lambda: asked.append(1) or calibration) as files:
        latency = shipped_latency(files, latency_cfg)
    assert asked == [1] and latency.method == "tflite_int8, LiteRT XNNPACK"
    details = Interpreter(model_content=timed_files[0]).get_input_details()[0]
    assert (details["dtype"], details["quantization"]) == (np.uint8, (1.0, 0))  # the export's raw-pixel int8 model


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What TensorFlow and Keras write while the test runs: "saved_model", "tflite" (a conversion), "keras" (a save)."""
    from tensorflow.lite.python.lite import TFLiteSavedModelConverterV2

    made: list[str] = []
    saved_model_writer = type(keras.export.ExportArchive())  # the backend's class: ExportArchive() makes one of it
    for owner, name, kind in ((saved_model_writer, "write_out", "saved_model"),
                              (TFLiteSavedModelConverterV2, "convert", "tflite"), (keras.Model, "save", "keras")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args, _real=real, _kind=kind, **kwargs: made.append(_kind) or _real(*args, **kwargs))
    return made


@pytest.mark.parametrize("headline", ["tflite_float32", pytest.param("tflite_int8", marks=pytest.mark.slow)])
def test_a_run_makes_each_file_once_and_ships_the_file_it_timed(headline: str, tmp_path: Path, tiny_images: Path,
                                                                timed_files: list[bytes], made: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose(quick_overrides(tiny_images, tmp_path, "export.formats=[keras,saved_model,tflite_float32,tflite_int8]",
                                  f"latency.format={headline}", "export.representative_images=8",
                                  "export.int8.max_drop=1.0", f"data.cache_dir={tmp_path / 'cache'}",
                                  f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                  f"mlflow.artifact_location={tmp_path / 'artifacts'}"))
    data = prepare_data(cfg)
    model = build_classifier(cfg, data.num_classes)
    model.save(tmp_path / "model.keras")  # the train stage's
    shipped_files = {}  # each TFLite file of the bundle as written, before its metadata
    add_metadata = bundle_module.add_metadata
    monkeypatch.setattr(bundle_module, "add_metadata",
                        lambda path, *args: shipped_files.update({path.name: path.read_bytes()}) or add_metadata(path, *args))
    made.clear()

    results: dict = {}
    with contextlib.closing(_Stages(cfg, tmp_path, None, None, data, results)) as stages:
        stages.time()
        stages.export()

    # one SavedModel, one conversion per TFLite format (tflite_int8: the plain recipe, kept), no second .keras save
    assert sorted(made) == ["saved_model", "tflite", "tflite"]
    assert timed_files == [shipped_files[artifact_path(tmp_path, headline).name]]  # the bundle ships the file timed
    bundle = tmp_path / "export"
    assert {"serve", "serving_float"} <= set(tf.saved_model.load(str(bundle / "saved_model")).signatures)
    assert (bundle / "model.keras").read_bytes() == (tmp_path / "model.keras").read_bytes()
