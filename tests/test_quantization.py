"""The int8 recipe: tried in order on the validation split until one is within budget; each recipe's file runs in LiteRT."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from finetune import quantization
from finetune.artifacts import TFLitePredictor
from finetune.dataset import FileSource, Split
from finetune.export import int8_data
from finetune.quantization import Candidate, Int8Data, Verdicts, choose, choose_int8

SIZE = 4


class OutlierBrightness(tf.Module):
    """Bright (class 1) or dark (class 0) from a small feature that shares its tensor with a huge one.

    The 1x1 convolution gives two channels: brightness - 0.5 (within +-0.5) and 300 x red. One int8 scale
    for the whole tensor (per-tensor activations) is ~1.2, so the brightness channel rounds to zero and
    every image looks alike: plain int8 loses, however many images calibrate it.
    """

    kernel = tf.constant([[[[1 / 765, 300 / 255], [1 / 765, 0.0], [1 / 765, 0.0]]]], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec((1, SIZE, SIZE, 3), tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        features = tf.nn.conv2d(images, self.kernel, 1, "VALID") - tf.constant([0.5, 0.0])
        pooled = tf.reduce_mean(features, axis=[1, 2])
        return tf.nn.softmax(tf.matmul(pooled, tf.constant([[-40.0, 40.0], [0.0, 0.0]])))


class Brightness(tf.Module):
    """Bright (class 1) or dark (class 0): int8 is exact once calibration has seen both."""

    @tf.function(input_signature=[tf.TensorSpec((1, SIZE, SIZE, 3), tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        brightness = tf.reduce_mean(images, axis=[1, 2, 3])[:, None] / 255.0 - 0.5
        return tf.nn.softmax(tf.matmul(brightness, tf.constant([[-8.0, 8.0]])))


def saved(module: tf.Module, folder: Path) -> Path:
    """The module as a SavedModel with a `serving_float` endpoint, like a bundle's."""
    tf.saved_model.save(module, str(folder), signatures={"serving_float": module.__call__})
    return folder


class KerasLike:
    """What choose_int8 needs of the Keras model: predict()."""

    def __init__(self, module: tf.Module) -> None:
        self.module = module

    def predict(self, images: np.ndarray, verbose: int = 0) -> np.ndarray:
        return np.concatenate([self.module(image[None]).numpy() for image in images])


def solid(grey: np.ndarray, red: np.ndarray | None = None) -> np.ndarray:
    """One-colour SIZE x SIZE images of these grey levels (red channel replaced when given)."""
    pixels = np.stack([grey, grey, grey], -1).astype("float32")
    if red is not None:
        pixels[:, 0] = red
        pixels[:, 1] = pixels[:, 2] = (3 * grey - red) / 2  # brightness stays `grey`
    return np.broadcast_to(np.clip(pixels, 0, 255)[:, None, None, :], (len(grey), SIZE, SIZE, 3)).astype("uint8")


def export_cfg(max_drop: float = 0.01, integer_only: bool = False, representative_images: int = 20,
               max_slowdown: float | None = None) -> object:
    """The export keys the chooser reads; no latency budget (the default) unless a test sets one."""
    return OmegaConf.create({"representative_images": representative_images,
                             "int8": {"max_drop": max_drop, "integer_only": integer_only, "max_slowdown": max_slowdown}})


LATENCY_CFG = OmegaConf.create({"threads": 1, "warmup": 1, "runs": 3})


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Int8Data]:
    """OutlierBrightness and images whose brightness is 0.5 +- 0.1 (so the small channel is +-0.1), red 0..255."""
    rng = np.random.default_rng(0)
    grey = np.concatenate([rng.uniform(100, 120, 20), rng.uniform(135, 155, 20)])
    val = solid(grey, red=rng.uniform(60, 200, 40))
    train = solid(rng.uniform(100, 155, 60), red=np.linspace(0, 255, 60))
    data = Int8Data(val, (grey > 127.5).astype(int), lambda count: train[:count], len(train))
    return saved(OutlierBrightness(), tmp_path_factory.mktemp("outlier") / "saved_model"), data


LABELS = np.zeros(100, int)
FLOAT_PREDICTIONS = np.r_[np.zeros(90, int), np.ones(10, int)]  # float: 90 right, the last 10 wrong


def predictions(lost: int, gained: int = 0) -> np.ndarray:
    """The float model's predictions with `lost` of its right ones made wrong and `gained` of its wrong ones right."""
    changed = FLOAT_PREDICTIONS.copy()
    changed[:lost] = 1
    changed[100 - gained:] = 0
    return changed


def injected(recipes: list[tuple[str, np.ndarray]], converted: list[str]) -> tuple[Iterator[Candidate], dict]:
    """Candidates whose 'model' is their place and name, converted lazily (recorded in `converted`), and their predictions."""
    def generate() -> Iterator[Candidate]:
        for place, (recipe, _) in enumerate(recipes):
            converted.append(recipe)
            yield Candidate(recipe, f"{place} {recipe}".encode(), 10, 0.0)
    return generate(), {f"{place} {recipe}".encode(): predicted for place, (recipe, predicted) in enumerate(recipes)}


def budget(max_drop: float = 0.01, max_slowdown: float = 2.0) -> Verdicts:
    return Verdicts(FLOAT_PREDICTIONS, LABELS, max_drop, max_slowdown)


def same_speed(model: bytes) -> float:
    return 1.0


def latencies(by_recipe: dict[str, float]) -> Callable[[bytes], float]:
    """Latency (ms) of an injected candidate by its recipe name; 1 ms when not named."""
    return lambda model: by_recipe.get(model.decode().split(" ", 1)[1], 1.0)


@pytest.fixture()
def any_file_is_integer_plain_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The injected 'models' are not TFLite files: describe them as plain int8 files."""
    monkeypatch.setattr(quantization, "float_ops", lambda model: [])
    monkeypatch.setattr(quantization, "is_integer_only", lambda model: True)
    monkeypatch.setattr(quantization, "input_type", lambda model: "uint8")


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_recipes_are_tried_in_order_and_the_first_within_budget_is_kept() -> None:
    converted: list[str] = []
    recipes, predicted = injected([("int8", predictions(5)), ("int8_more_calibration", predictions(2)),
                                   ("int8_float_ops", predictions(1)), ("int8_float_ops", predictions(0)),
                                   ("int16x8", predictions(0))], converted)
    choice = choose(recipes, predicted.__getitem__, same_speed, budget())
    assert (choice.recipe, choice.val_lost, choice.within_budget) == ("int8_float_ops", 0.01, True)
    assert [t["recipe"] for t in choice.tried] == ["int8", "int8_more_calibration", "int8_float_ops"]
    assert converted == ["int8", "int8_more_calibration", "int8_float_ops"]  # nothing after the first within budget
    assert (choice.float_val_accuracy, choice.val_accuracy) == (0.9, 0.89)
    assert choice.val_drop == pytest.approx(0.01)


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_images_gained_by_luck_do_not_pay_for_images_lost() -> None:
    """Losing 3 images and gaining 3 is no loss of accuracy, but 3 images lost: over a budget of 1."""
    recipes, predicted = injected([("int8", predictions(3, gained=3)), ("int8_more_calibration", predictions(1))], [])
    choice = choose(recipes, predicted.__getitem__, same_speed, budget())
    assert choice.tried[0]["val_drop"] == 0 and choice.tried[0]["val_lost"] == 0.03
    assert choice.recipe == "int8_more_calibration"


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_a_loss_of_exactly_the_budget_is_within_it() -> None:
    recipes, predicted = injected([("int8", predictions(1)), ("int8_more_calibration", predictions(0))], [])
    assert choose(recipes, predicted.__getitem__, same_speed, budget()).recipe == "int8"


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_when_no_recipe_is_within_budget_the_one_that_lost_least_is_kept_and_said() -> None:
    recipes, predicted = injected([("int8", predictions(8)), ("int8_more_calibration", predictions(4)),
                                   ("int8_float_ops", predictions(4, gained=2)), ("int16x8", predictions(6))], [])
    choice = choose(recipes, predicted.__getitem__, same_speed, budget())
    assert (choice.recipe, choice.within_budget) == ("int8_more_calibration", False)  # the earliest of the best
    assert len(choice.tried) == 4
    assert choice.model == b"1 int8_more_calibration"


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_a_recipe_slower_than_max_slowdown_is_not_kept_however_accurate() -> None:
    """16x8 loses nothing but runs 12x as long as plain int8 (no XNNPACK kernels): over a budget of 2x."""
    recipes, predicted = injected([("int8", predictions(4)), ("int8_float_ops", predictions(3)),
                                   ("int16x8", predictions(0))], [])
    choice = choose(recipes, predicted.__getitem__, latencies({"int8": 4.0, "int8_float_ops": 6.0, "int16x8": 50.0}),
                    budget())
    assert (choice.recipe, choice.within_budget) == ("int8_float_ops", False)  # the fewest lost of the fast enough
    assert [round(t["slowdown"], 2) for t in choice.tried] == [1.0, 1.5, 12.5]
    assert choice.slowdown == 1.5 and choice.max_slowdown == 2.0


@pytest.mark.usefixtures("any_file_is_integer_plain_int8")
def test_a_recipe_within_both_budgets_ends_the_search() -> None:
    converted: list[str] = []
    recipes, predicted = injected([("int8", predictions(4)), ("int8_float_ops", predictions(1)),
                                   ("int16x8", predictions(0))], converted)
    choice = choose(recipes, predicted.__getitem__, latencies({"int8": 4.0, "int8_float_ops": 7.9}), budget())
    assert (choice.recipe, choice.within_budget) == ("int8_float_ops", True)
    assert converted == ["int8", "int8_float_ops"]


def test_latency_is_timed_as_the_bundle_times_files(outlier: tuple[Path, Int8Data], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate is timed by LiteRT with latency.threads (the bundle's protocol), and the card shows it."""
    seen = []
    real = quantization.measure_tflite_latency
    monkeypatch.setattr(quantization, "measure_tflite_latency",
                        lambda path, fmt, threads, warmup, runs: seen.append((threads, warmup, runs)) or real(path, fmt, threads, warmup, runs))
    saved_model, data = outlier
    choice = choose_int8(KerasLike(OutlierBrightness()), saved_model, data, export_cfg(integer_only=True), LATENCY_CFG)
    assert seen == [(1, 1, 3)] * len(choice.tried)
    assert all(t["latency_ms"] > 0 for t in choice.tried) and choice.tried[0]["slowdown"] == 1.0
    record = choice.record({"accuracy": 0.5, "size_mb": 0.01, "latency_median_ms": 0.1, "latency_p90_ms": 0.2}, 1.0)
    assert choice.max_slowdown is None and "max_slowdown" not in quantization.summary(record)
    assert "ran at most" not in quantization.render(record) and "| latency (ms) | x plain int8 |" in quantization.render(record)


def test_plain_int8_within_budget_is_kept_after_one_conversion(tmp_path: Path) -> None:
    grey = np.linspace(60, 200, 30)
    images = solid(grey)
    data = Int8Data(images, (grey > 127.5).astype(int), lambda count: images[:count], len(images))
    choice = choose_int8(KerasLike(Brightness()), saved(Brightness(), tmp_path / "sm"), data, export_cfg(), LATENCY_CFG)
    assert (choice.recipe, choice.within_budget, choice.integer_only, choice.float_ops) == ("int8", True, True, [])
    assert [t["recipe"] for t in choice.tried] == ["int8"]


def test_a_plain_file_the_run_made_is_the_first_candidate_not_converted_again(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    grey = np.linspace(60, 200, 30)
    images = solid(grey)
    saved_model = saved(Brightness(), tmp_path / "sm")
    plain = quantization.convert_int8(saved_model, images[:20])  # as the run's `time` stage converts it
    converted, loaded = [], []
    monkeypatch.setattr(quantization, "convert_int8", lambda *args: converted.append(1))
    data = Int8Data(images, (grey > 127.5).astype(int), lambda count: loaded.append(count) or images[:count], len(images))
    choice = choose_int8(KerasLike(Brightness()), saved_model, data, export_cfg(), LATENCY_CFG, plain=lambda: plain)
    assert (choice.recipe, choice.model, converted, loaded) == ("int8", plain, [], [])


def test_more_calibration_images_are_the_second_recipe(tmp_path: Path) -> None:
    """Calibrated on dark images only, int8 clips every bright image to 'dark'; twice the images include bright ones."""
    grey = np.linspace(60, 200, 30)
    training = solid(np.concatenate([np.linspace(0, 100, 20), np.linspace(100, 255, 20)]))  # the first 20 are dark
    data = Int8Data(solid(grey), (grey > 127.5).astype(int), lambda count: training[:count], len(training))
    choice = choose_int8(KerasLike(Brightness()), saved(Brightness(), tmp_path / "sm"), data, export_cfg(), LATENCY_CFG)
    assert [(t["recipe"], t["calibration_images"]) for t in choice.tried] == [("int8", 20), ("int8_more_calibration", 40)]
    assert choice.tried[0]["val_drop"] > 0.3
    assert (choice.recipe, choice.within_budget, choice.integer_only) == ("int8_more_calibration", True, True)


def test_ops_kept_float_rescue_what_calibration_cannot(outlier: tuple[Path, Int8Data]) -> None:
    saved_model, data = outlier
    choice = choose_int8(KerasLike(OutlierBrightness()), saved_model, data, export_cfg(), LATENCY_CFG)
    assert choice.float_val_accuracy == 1.0
    recipes = [t["recipe"] for t in choice.tried]
    assert recipes[:2] == ["int8", "int8_more_calibration"] and choice.tried[1]["val_drop"] > 0.3
    assert set(recipes[2:]) == {"int8_float_ops"} and "int16x8" not in recipes  # stopped at the first within budget
    assert [len(t["float_ops_asked"]) for t in choice.tried[2:]] == [1, 2, 4, 8][: len(recipes) - 2]
    assert (choice.recipe, choice.within_budget, choice.integer_only) == ("int8_float_ops", True, False)
    assert choice.float_ops and choice.input == quantization.INPUTS["uint8"]  # still raw uint8 pixels in
    measured = {"accuracy": 0.5, "size_mb": 0.01, "latency_median_ms": 0.1, "latency_p90_ms": 0.2}
    record = choice.record(measured, float_test_accuracy=1.0)
    assert quantization.summary(record).startswith(
        f"int8 recipe int8_float_ops ({len(choice.float_ops)} ops kept float, not integer-only): validation accuracy 1.0000")
    card = quantization.render(record)
    assert f"Ops kept in float ({len(choice.float_ops)}): `{choice.float_ops[0]}`" in card
    assert "Integer-only: no (NPUs and Edge TPUs need integer-only models)" in card
    assert "| accuracy loss | +0.0000 | +0.5000 |" in card


def test_one_calibration_serves_recipes_2_and_3(outlier: tuple[Path, Int8Data], monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The SavedModel is converted once for plain int8 and once for the shared calibration, not once per recipe."""
    saved_model, data = outlier
    from_saved_model = tf.lite.TFLiteConverter.from_saved_model
    conversions = []
    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model",
                        lambda *args, **kwargs: conversions.append(1) or from_saved_model(*args, **kwargs))
    choice = choose_int8(KerasLike(OutlierBrightness()), saved_model, data, export_cfg(), LATENCY_CFG)
    assert [t["recipe"] for t in choice.tried][:3] == ["int8", "int8_more_calibration", "int8_float_ops"]
    assert len(conversions) == 2
    # the second recipe quantized from that calibration is the file the converter makes from the same images
    calibration = data.training_images(40)
    shared = quantization.quantize_except(quantization.calibrate(saved_model, calibration), [])
    converted = quantization.convert_int8(saved_model, calibration)
    outputs = []
    for name, model in (("shared", shared), ("converted", converted)):
        (tmp_path / f"{name}.tflite").write_bytes(model)
        outputs.append(TFLitePredictor(tmp_path / f"{name}.tflite", threads=1)(data.val_images))
    np.testing.assert_array_equal(*outputs)
    assert quantization.float_ops(shared) == [] and quantization.is_integer_only(shared)


def test_integer_only_keeps_integer_recipes_and_reports_the_drop(outlier: tuple[Path, Int8Data]) -> None:
    saved_model, data = outlier
    choice = choose_int8(KerasLike(OutlierBrightness()), saved_model, data, export_cfg(integer_only=True), LATENCY_CFG)
    assert [t["recipe"] for t in choice.tried] == ["int8", "int8_more_calibration"]
    assert (choice.integer_only_asked, choice.integer_only, choice.within_budget) == (True, True, False)
    assert choice.val_drop > 0.3 and choice.float_ops == []


def test_16x8_is_the_fourth_recipe_and_takes_float_pixels(outlier: tuple[Path, Int8Data],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "FLOAT_OPS_KEPT", ())  # skip the third recipe
    saved_model, data = outlier
    choice = choose_int8(KerasLike(OutlierBrightness()), saved_model, data, export_cfg(), LATENCY_CFG)
    assert [t["recipe"] for t in choice.tried] == ["int8", "int8_more_calibration", "int16x8"]
    assert (choice.recipe, choice.within_budget, choice.integer_only) == ("int16x8", True, False)
    assert choice.input == quantization.INPUTS["float32"]


def test_16x8_calibrates_once_and_gives_the_converters_file(outlier: tuple[Path, Int8Data],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    saved_model, data = outlier
    calibration = data.training_images(40)
    passes = []
    samples = quantization.full_range_calibration
    monkeypatch.setattr(quantization, "full_range_calibration",
                        lambda images: (lambda: passes.append(1) or samples(images)()))
    model = quantization.convert_int16x8(saved_model, calibration)
    assert len(passes) == 1
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_float"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    assert model == converter.convert()  # the converter's defaults: two passes, the same file


@pytest.mark.parametrize("recipe", ["int8", "int8_float_ops", "int16x8"])
def test_each_recipe_file_runs_in_litert_as_predict_feeds_it(recipe: str, outlier: tuple[Path, Int8Data],
                                                             tmp_path: Path) -> None:
    saved_model, data = outlier
    calibration = data.training_images(60)
    if recipe == "int8":
        model = quantization.convert_int8(saved_model, calibration)
    elif recipe == "int16x8":
        model = quantization.convert_int16x8(saved_model, calibration)
    else:
        calibrated = partial(quantization.calibrate, saved_model, calibration)
        model = next(quantization.float_op_candidates(calibrated, calibration, len(calibration), [2])).model
    path = tmp_path / "model.tflite"
    path.write_bytes(model)
    predictor = TFLitePredictor(path, threads=1)
    probabilities = predictor(data.val_images)
    assert probabilities.shape == (40, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=0.02)
    details = predictor.input
    expected = (np.float32, (0.0, 0)) if recipe == "int16x8" else (np.uint8, quantization.RAW_PIXELS)
    assert (details["dtype"], details["quantization"]) == expected
    assert quantization.is_integer_only(model) == (recipe == "int8")
    assert bool(quantization.float_ops(model)) == (recipe == "int8_float_ops")


class Blowup(tf.Module):
    """`scaled` (pixels / 255) shares one int8 scale with the sum it feeds, whose range a white pixel makes ~5,000."""

    @tf.function(input_signature=[tf.TensorSpec((1, SIZE, SIZE, 3), tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        scaled = tf.multiply(images, 1 / 255.0, name="scaled")
        blown = tf.add(scaled, tf.nn.relu(images - 250.0) * 1000.0, name="blown_up")
        pooled = tf.reduce_mean(blown, axis=[1, 2])
        return tf.nn.softmax(tf.matmul(pooled, tf.constant([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])))


def test_ops_are_ranked_by_their_quantization_error(tmp_path: Path) -> None:
    """`scaled` rounds to zero in int8 (noise-to-signal 1): it is the op kept float first."""
    calibration = np.random.default_rng(0).integers(0, 200, (30, SIZE, SIZE, 3)).astype("uint8")
    calibration[-1] = 255
    calibrated = partial(quantization.calibrate, saved(Blowup(), tmp_path / "sm"), calibration)
    kept = next(quantization.float_op_candidates(calibrated, calibration, len(calibration), [1]))
    assert kept.float_ops_asked == ["scaled"]
    assert quantization.float_ops(kept.model) == ["MUL scaled"]


def test_noise_to_signal_is_the_error_power_over_the_signal_power() -> None:
    float_values = np.array([1.0, -1.0, 2.0, -2.0])
    quantized = np.array([1, -1, 3, -2], np.int8)  # dequantized with scale 1, zero point 0: one error of 1
    assert quantization.noise_to_signal(float_values, quantized, 1.0, 0) == pytest.approx(0.25 / 2.5)
    assert quantization.noise_to_signal(float_values, quantized * 2 + 5, 0.5, 5) == pytest.approx(0.1)


def test_the_recipe_is_chosen_on_validation_images_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """export.int8_data reads the validation split and training images, never the test split; the chooser
    evaluates candidates on those validation images only."""
    splits = {}
    for split, grey in (("train", 50), ("val", 150), ("test", 250)):
        paths = []
        for index in range(4):
            path = tmp_path / f"{split}{index}.png"
            Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(path)
            paths.append(str(path))
        splits[split] = Split(paths, [0, 1, 0, 1], FileSource(tmp_path))
    data = int8_data(OmegaConf.create({"seed": 0, "backbone": {"input_size": SIZE},
                                      "export": {"representative_images": 2}}), splits)
    assert (np.concatenate(list(data.val_images)) == 150).all() and list(data.val_labels) == [0, 1, 0, 1]  # in batches
    assert (data.training_images(3) == 50).all() and data.training_count == 4
    seen = []
    monkeypatch.setattr(quantization, "tflite_predictions", lambda model, images: seen.append(images) or 1 - data.val_labels)
    choose_int8(KerasLike(Brightness()), saved(Brightness(), tmp_path / "sm"), data, export_cfg(representative_images=2), LATENCY_CFG)
    assert len(seen) >= 2 and all(images is data.val_images for images in seen)
