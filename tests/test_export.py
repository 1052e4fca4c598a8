"""Export bundle: every format written, loads and predicts; float parity; int8 is integer-only and takes raw pixels;
atomicity; the bundle in MLflow; TFLite metadata, and every TFLite file in MediaPipe Tasks' ImageClassifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import mediapipe as mp
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from conftest import SHARED_WEIGHTS
from finetune import export as export_module
from finetune import artifacts, predict, quantization, tflite_metadata
from finetune.artifacts import (
    FLOAT_FORMATS, FORMATS, TFLITE_FORMATS, ExportError, TFLitePredictor, artifact_path, load_predictor,
)
from finetune.bundle import convert_tflite, export_bundle
from finetune.config import UsageError, compose, validate_export
from finetune.quantization import Int8Data
from finetune.model import build_classifier
from finetune.model_files import ModelFiles
from finetune.tracking import tracked_run

SIZE = 64
CLASSES = ["a", "b", "c"]
EXPORT_CFG = OmegaConf.create({"formats": list(FORMATS), "representative_images": 20,
                               "int8": {"max_drop": 1.0, "integer_only": False, "max_slowdown": 2.0},  # plain int8 kept: recipes in test_quantization
                               "tolerance": {"float32": 1e-3, "float16": 5e-2}})
LATENCY_CFG = OmegaConf.create({"format": "tflite_float32", "threads": 1, "keras_threads": None, "warmup": 1, "runs": 3})
METADATA = {
    "backbone": {"name": "mobilenet_v2", "alpha": 0.35}, "input_size": SIZE, "mlflow_run_id": "0123abcd",
    "dataset": {"name": "synthetic", "root": "/x", "fingerprint": "f", "train_images": 1, "val_images": 1, "test_images": 1},
    "versions": {"keras": keras.__version__}, "machine": "test", "latency": {"warmup": 1, "runs": 3}, "config": {},
}


@pytest.fixture(scope="module")
def trained_model() -> keras.Model:
    """MobileNetV2 0.35 with the real ImageNet weights and a head fitted a little, so outputs are not uniform."""
    cfg = OmegaConf.create({
        "backbone": {"name": "mobilenet_v2", "alpha": 0.35, "input_size": SIZE, "unfreeze_blocks": 0,
                     "weights": str(SHARED_WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")},
        "head": {"pooling": "avg", "dropout": 0.0, "hidden_units": [], "class_weight": None},
    })
    keras.utils.set_random_seed(0)
    model = build_classifier(cfg, len(CLASSES))
    images, labels = images_and_labels(30, seed=1)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(images.astype("float32"), labels, epochs=3, verbose=0)
    return model


def images_and_labels(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels][:, None, None, :]
    return np.clip(base + rng.normal(0, 40, (count, SIZE, SIZE, 3)), 0, 255).astype("uint8"), labels


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, trained_model: keras.Model) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("export") / "export"
    test_images, test_labels = images_and_labels(12, seed=2)
    no_black_or_white = np.clip(images_and_labels(20, seed=3)[0], 16, 240)  # calibration; int8 input still 0..255
    with files_of(trained_model, no_black_or_white) as files:
        reports = export_bundle(files, out, class_names=CLASSES, test_images=test_images, test_labels=test_labels,
                                int8_data=int8_data(*images_and_labels(9, seed=8), no_black_or_white),
                                export_cfg=EXPORT_CFG, latency_cfg=LATENCY_CFG, metadata=METADATA)
    return out, reports


def files_of(model: keras.Model, training: np.ndarray) -> ModelFiles:
    """The model's files as a run makes them: the SavedModel with `serve` (top 2), plain int8 calibrated on
    the first representative_images training images."""
    return ModelFiles(model, 2, lambda: training[:EXPORT_CFG.representative_images])


def int8_data(val_images: np.ndarray, val_labels: np.ndarray, training: np.ndarray) -> Int8Data:
    return Int8Data(val_images, val_labels, lambda count: training[:count], len(training))


def test_every_format_is_written_measured_and_described(bundle: tuple[Path, list]) -> None:
    out, reports = bundle
    assert [r.format for r in reports] == list(FORMATS)
    for fmt in FORMATS:
        assert artifact_path(out, fmt).exists(), fmt
    assert (out / "labels.txt").read_text().split() == CLASSES
    metadata = json.loads((out / "metadata.json").read_text())
    assert [a["format"] for a in metadata["artifacts"]] == list(FORMATS)
    card = (out / "model_card.md").read_text()
    for report in reports:
        assert 0 < report.size_mb and 0 < report.latency_median_ms <= report.latency_p90_ms
        assert f"| {report.format} |" in card
        if report.format.startswith("tflite_"):  # every TFLite file timed by LiteRT at latency.threads
            assert (report.latency_method, report.threads) == (f"{report.format}, LiteRT XNNPACK", 1)
    assert "TFLite files run by the LiteRT interpreter with XNNPACK" in card
    sizes = {r.format: r.size_mb for r in reports}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["tflite_float32"]  # quantization shrinks


def test_each_artifact_loads_and_float_ones_match_keras(bundle: tuple[Path, list], trained_model: keras.Model) -> None:
    out, reports = bundle
    images, _ = images_and_labels(6, seed=4)
    reference = np.asarray(trained_model(images.astype("float32")))
    assert reference.max() - reference.min() > 0.05  # not a trivially uniform model
    for fmt in FORMATS:
        probabilities = load_predictor(out, fmt)(images)
        assert probabilities.shape == (6, 3)
        difference = np.abs(probabilities - reference)
        if fmt in FLOAT_FORMATS:
            assert difference.max() <= (5e-2 if fmt == "tflite_float16" else 1e-3), fmt
        else:  # quantized: close on average, and still probability distributions
            assert difference.mean() <= 0.1, fmt
            np.testing.assert_allclose(probabilities.sum(-1), 1, atol=0.02)
    by_format = {r.format: r for r in reports}
    assert by_format["tflite_float32"].max_prob_diff <= 1e-3
    assert by_format["tflite_float32"].top1_agreement == 1.0


def test_saved_model_serves_uint8_images_of_any_size(bundle: tuple[Path, list], trained_model: keras.Model) -> None:
    import tensorflow as tf

    serve = tf.saved_model.load(str(bundle[0] / "saved_model")).signatures["serve"]
    big = np.random.default_rng(0).integers(0, 255, (2, 120, 90, 3), dtype=np.uint8)
    out = serve(images=tf.constant(big))
    expected = trained_model(tf.image.resize(big.astype("float32"), (SIZE, SIZE)))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-4)
    assert out["top_k_indices"].shape == (2, 2)


def test_int8_model_is_integer_only_and_takes_raw_pixels(bundle: tuple[Path, list]) -> None:
    interpreter = Interpreter(model_path=str(artifact_path(bundle[0], "tflite_int8")))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_input_details()[0]["quantization"] == (1.0, 0)  # pixel values as they are
    assert interpreter.get_output_details()[0]["dtype"] == np.uint8
    float_tensors = [t["name"] for t in interpreter.get_tensor_details() if t["dtype"] == np.float32]
    assert float_tensors == []


def test_the_card_and_metadata_say_how_int8_was_quantized(bundle: tuple[Path, list]) -> None:
    out, reports = bundle
    record = json.loads((out / "metadata.json").read_text())["int8"]
    measured = next(r for r in reports if r.format == "tflite_int8")
    assert record["tried"][0]["recipe"] == "int8" and record["recipe"] == record["tried"][-1]["recipe"]
    assert (record["test_accuracy"], record["size_mb"], record["latency_median_ms"]) == (
        measured.accuracy, measured.size_mb, measured.latency_median_ms)
    assert record["float_test_accuracy"] == pytest.approx(measured.accuracy - measured.accuracy_delta)
    assert record["val_drop"] == pytest.approx(record["float_val_accuracy"] - record["val_accuracy"])
    assert record["val_lost"] >= record["val_drop"] and record["within_budget"] == (record["val_lost"] <= 0.01)
    assert record["integer_only"] == (record["float_ops"] == [] and record["recipe"] != "int16x8")
    card = (out / "model_card.md").read_text()
    assert f"- Recipe `{record['recipe']}`, calibrated on {record['calibration_images']} training images" in card
    assert f"| int8 file | {record['val_accuracy']:.4f} | {record['test_accuracy']:.4f} |" in card


def test_a_run_saved_before_the_int8_keys_exports_with_their_defaults() -> None:
    defaults = compose([]).export
    saved = OmegaConf.create(OmegaConf.to_container(defaults))
    del saved["int8"]
    saved.formats = ["tflite_int8"]
    with pytest.raises(UsageError, match="export.int8.max_drop must be set"):
        validate_export(saved)
    settings = export_module.with_new_keys(saved)
    validate_export(settings)
    assert (settings.int8, list(settings.formats)) == (defaults.int8, ["tflite_int8"])


def test_failed_export_leaves_no_bundle(tmp_path: Path, trained_model: keras.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(saved_model: Path, calibration: np.ndarray) -> bytes:
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(quantization, "convert_int8", broken)
    images, labels = images_and_labels(4, seed=5)
    with pytest.raises(RuntimeError, match="converter crashed"), files_of(trained_model, images) as files:
        export_bundle(files, tmp_path / "export", class_names=CLASSES, test_images=images, test_labels=labels,
                      int8_data=int8_data(images, labels, images), export_cfg=EXPORT_CFG, latency_cfg=LATENCY_CFG,
                      metadata=METADATA)
    assert list(tmp_path.iterdir()) == []


def test_float_drift_beyond_tolerance_fails_loudly(tmp_path: Path, trained_model: keras.Model) -> None:
    strict = OmegaConf.merge(EXPORT_CFG, {"formats": ["tflite_float16"], "tolerance": {"float16": 1e-9}})
    images, labels = images_and_labels(4, seed=6)
    with (pytest.raises(ExportError, match="tflite_float16 differs from the Keras model"),
          files_of(trained_model, images) as files):
        export_bundle(files, tmp_path / "export", class_names=CLASSES, test_images=images, test_labels=labels,
                      int8_data=None, export_cfg=strict, latency_cfg=LATENCY_CFG, metadata=METADATA)
    assert list(tmp_path.iterdir()) == []


class Brightness(tf.Module):
    """Class 1 for bright images, class 0 for dark ones: a model small enough to convert in a test."""

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 3), tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        brightness = tf.reduce_mean(images, axis=[1, 2, 3])[:, None] / 255.0 - 0.5
        return tf.nn.softmax(tf.matmul(brightness, tf.constant([[-8.0, 8.0]])))


def solid_images(darkest: float, brightest: float) -> np.ndarray:
    """21 one-colour 4x4 images from darkest to brightest: calibration that spans the model's whole range."""
    return np.broadcast_to(np.linspace(darkest, brightest, 21)[:, None, None, None], (21, 4, 4, 3)).astype("uint8")


@pytest.fixture(scope="module")
def brightness_saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Brightness model as a SavedModel with a `serving_float` endpoint, like a bundle's."""
    path = tmp_path_factory.mktemp("brightness") / "saved_model"
    module = Brightness()
    tf.saved_model.save(module, str(path), signatures={"serving_float": module.__call__})
    return path


@pytest.fixture(scope="module")
def narrow_int8_model(tmp_path_factory: pytest.TempPathFactory, brightness_saved_model: Path) -> Path:
    """An int8 Brightness model calibrated on pixels up to 200 only: its uint8 input scale is 200/255."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(brightness_saved_model), signature_keys=["serving_float"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None].astype("float32")] for image in solid_images(0, 200))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    path = tmp_path_factory.mktemp("narrow") / "brightness_int8.tflite"
    path.write_bytes(converter.convert())
    return path


def test_int8_predictor_clips_pixels_beyond_the_input_range(narrow_int8_model: Path) -> None:
    predictor = TFLitePredictor(narrow_int8_model, threads=1)
    scale, zero_point = predictor.input["quantization"]
    assert (round(scale * 255), zero_point) == (200, 0)  # 255 is beyond the input's range
    white, brightest = (np.full((1, 4, 4, 3), value, np.uint8) for value in (255, 200))
    np.testing.assert_array_equal(predictor(white), predictor(brightest))  # saturates (wrapped: 255 -> 69, dark)
    assert predictor(white)[0].argmax() == 1


def test_int8_export_takes_raw_pixels_after_a_narrow_calibration(brightness_saved_model: Path) -> None:
    model = convert_tflite(brightness_saved_model, "tflite_int8", solid_images(40, 200))
    details = Interpreter(model_content=model).get_input_details()[0]
    assert (details["dtype"], details["quantization"]) == (np.uint8, (1.0, 0))


def test_an_int8_input_that_is_not_raw_pixels_fails_the_export(brightness_saved_model: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "full_range_calibration",
                        lambda images: lambda: ([image[None].astype("float32")] for image in images))
    with pytest.raises(ExportError, match="tflite_int8 input is uint8 with scale 0.7843.* and zero point 0; raw pixels"):
        convert_tflite(brightness_saved_model, "tflite_int8", solid_images(0, 200))


def test_predict_finds_the_bundle_a_crash_left_as_old(tmp_path: Path, bundle: tuple[Path, list],
                                                      capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(bundle[0], tmp_path / "export.old")  # a crash between the swap's two renames
    Image.fromarray(images_and_labels(1, seed=7)[0][0]).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit) as exit_status:
        predict.main([str(tmp_path / "export"), str(tmp_path / "photo.png"), "--json"])
    assert exit_status.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bundle"] == str(tmp_path / "export.old")
    assert result["results"][0]["predictions"][0]["label"] in CLASSES


def test_predict_breaks_ties_like_the_bundle_measure(bundle: tuple[Path, list], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tied = np.array([[0.2, 0.4, 0.4]])  # uint8 outputs tie often; the accuracy in the model card takes argmax
    monkeypatch.setattr(artifacts, "load_predictor", lambda bundle, fmt: lambda images: tied)
    Image.fromarray(images_and_labels(1, seed=7)[0][0]).save(tmp_path / "photo.png")
    (record,) = predict.predict_files(bundle[0], "tflite_int8", [tmp_path / "photo.png"], top_k=3)
    assert [p["label"] for p in record["predictions"]] == ["b", "c", "a"]


def test_the_bundle_is_logged_to_mlflow_with_its_saved_model(tmp_path: Path, bundle: tuple[Path, list]) -> None:
    mlflow_cfg = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "export",
                                   "artifact_location": str(tmp_path / "artifacts"), "run_name": None})
    with tracked_run(mlflow_cfg, None, {}) as run:
        export_module._log_bundle(*bundle)
    client = MlflowClient(mlflow_cfg.tracking_uri)
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "export")}
    assert {f"export/{path.name}" for path in bundle[0].iterdir()} == logged
    saved_model = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "export/saved_model")}
    assert {"export/saved_model/saved_model.pb", "export/saved_model/variables"} <= saved_model


def test_every_tflite_file_carries_its_metadata(bundle: tuple[Path, list]) -> None:
    out = bundle[0]
    for fmt in TFLITE_FORMATS:
        shown = tflite_metadata.displayer(artifact_path(out, fmt))
        metadata = json.loads(shown.get_metadata_json())
        assert (metadata["name"], metadata["version"]) == ("mobilenet_v2 fine-tuned on synthetic", "0123abcd"), fmt
        assert all(part in metadata["description"] for part in ("mobilenet_v2 (alpha 0.35)", "synthetic", "0123abcd", "64x64"))
        assert metadata["min_parser_version"] == "1.0.0"
        (image,), (probabilities,) = (metadata["subgraph_metadata"][0][f"{end}_tensor_metadata"] for end in ("input", "output"))
        assert image["content"]["content_properties"] == {"color_space": "RGB"}
        assert image["process_units"] == [{"options_type": "NormalizationOptions", "options": {"mean": [0.0], "std": [1.0]}}]
        assert [(f["name"], f["type"]) for f in probabilities["associated_files"]] == [("labels.txt", "TENSOR_AXIS_LABELS")]
        assert shown.get_packed_associated_file_list() == ["labels.txt"]
        assert shown.get_associated_file_buffer("labels.txt") == (out / "labels.txt").read_bytes(), fmt


def mediapipe_categories(model: Path, files: list[Path]) -> list[list]:
    """MediaPipe Tasks' ImageClassifier (CPU delegate) on each image file: every category, best first."""
    base = BaseOptions(model_asset_path=str(model), delegate=BaseOptions.Delegate.CPU)
    with vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(base_options=base)) as classifier:
        return [classifier.classify(mp.Image.create_from_file(str(path))).classifications[0].categories for path in files]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """12 PNG photos at the model's input size, so that neither MediaPipe nor `finetune predict` resizes them."""
    folder = tmp_path_factory.mktemp("photos")
    paths = [folder / f"photo_{index:02d}.png" for index in range(12)]
    for path, image in zip(paths, images_and_labels(len(paths), seed=8)[0]):
        Image.fromarray(image).save(path)
    return paths


@pytest.mark.parametrize("fmt", TFLITE_FORMATS)
def test_mediapipe_image_classifier_names_the_labels_and_agrees_with_predict(bundle: tuple[Path, list],
                                                                            photos: list[Path], fmt: str) -> None:
    out = bundle[0]
    results = mediapipe_categories(artifact_path(out, fmt), photos)
    for categories in results:  # every class, named after labels.txt
        assert [c.category_name for c in sorted(categories, key=lambda c: c.index)] == CLASSES
    ours = [record["predictions"] for record in predict.predict_files(out, fmt, photos, top_k=len(CLASSES))]
    our_top1 = [predictions[0]["label"] for predictions in ours]
    assert len(set(our_top1)) > 1  # the photos do not all get one class: agreement is not trivial
    disagreements = [(categories, label) for categories, label in zip(results, our_top1) if categories[0].category_name != label]
    if fmt == "tflite_int8":  # uint8 probabilities can tie, and MediaPipe's sort leaves the order of ties open
        assert all(scores_by_name(categories)[label] == categories[0].score for categories, label in disagreements)
    else:
        assert disagreements == []
    for categories, predictions in zip(results, ours):  # the same scores, to predict's rounding (4 decimals)
        assert all(abs(scores_by_name(categories)[p["label"]] - p["probability"]) <= 1e-4 for p in predictions), fmt


def scores_by_name(categories: list) -> dict[str, float]:
    return {category.category_name: category.score for category in categories}
