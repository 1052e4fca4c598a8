"""The tflite_int8 file: a post-training quantization recipe chosen on the validation split, never the test split.

Plain full-integer int8 of some backbones (MobileNetV3: hard-swish, squeeze-excite, per-tensor activation
ranges) loses a few points in one run and almost none in the next. The export measures each candidate
file on the validation split against the float (Keras) model and tries these recipes in order, keeping
the first that loses at most `export.int8.max_drop` and runs at most `export.int8.max_slowdown` times as
long as the plain int8 file (LiteRT, `latency.threads`); when none does, the one that lost the fewest images
among those fast enough (plain int8 always is), and the model card says so:

1. `int8`: full-integer int8 calibrated on `export.representative_images` training images;
2. `int8_more_calibration`: the same, calibrated on twice as many (at most every training image);
3. `int8_float_ops`: TensorFlow Lite's QuantizationDebugger ranks the ops by their quantization error
   (noise-to-signal power of each op's output, the float op run on the same input) and the worst
   1, 2, 4, 8, 16 stay float;
4. `int16x8`: 16-bit activations with 8-bit weights (an op without a 16x8 kernel stays float).

The latency budget is there for 16x8: XNNPACK has no 16x8 kernels, so LiteRT runs it with its reference
kernels (MobileNetV3Small here: ~51 ms against ~4 ms for int8 and ~1.7 ms for float32); an "int8" file
slower than the float file it stands in for is no answer to a phone team.

What a file "loses" is the share of validation images the float model classifies right and the file
wrong. The net accuracy difference would credit the images it gets right by luck: on a 141-image split,
int8 files that changed the class of 8 images showed a net loss of one image and lost 3.5 points on
held-out images.

`export.int8.integer_only` keeps recipes 1 and 2 only. The int8 recipes take raw uint8 pixels (scale 1,
zero point 0) and give uint8 probabilities (x 256). 16x8 takes and gives float32, as the float files do:
its int16 input would be symmetric (zero point 0, scale 255/32767), so it cannot carry raw pixels.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import convert as tflite_convert  # private: the MLIR quantizer the converter itself calls

from finetune.artifacts import ExportError, Images, TFLitePredictor, keras_probabilities, predict_batches
from finetune.cost import measure_tflite_latency

RAW_PIXELS = (1.0, 0)  # the int8 file's input scale and zero point: uint8 pixel values go in as they are
FLOAT_OPS_KEPT = (1, 2, 4, 8, 16)  # at most 5 conversions of the third recipe (each one quantizes, nothing recalibrates)
DEBUG_IMAGES = 50  # calibration images the QuantizationDebugger runs to rank the ops
INPUTS = {
    "uint8": "uint8 raw pixels 0..255 (scale 1, zero point 0); uint8 output (probability x 256)",
    "float32": "float32 raw pixels 0..255 (not normalized), like the float files; float32 probabilities out",
}


@dataclass
class Int8Data:
    """What the recipes see: training images to calibrate on, the validation split to choose by."""

    val_images: Images  # an array, or batches (`dataset.ImageBatches`): read one batch at a time
    val_labels: np.ndarray
    training_images: Callable[[int], np.ndarray]  # n training images (the first n of a fixed order; all when fewer)
    training_count: int


@dataclass
class Candidate:
    """One converted file and how it was made."""

    recipe: str
    model: bytes
    calibration_images: int
    seconds: float  # to convert it (the first `int8_float_ops` one: and to rank the ops), then to measure it
    float_ops_asked: list[str] = field(default_factory=list)  # ops the recipe kept float on purpose


@dataclass
class Int8Choice:
    """The file the bundle keeps and what the choice measured (metadata.json `int8`)."""

    recipe: str
    calibration_images: int
    float_ops: list[str]  # ops of the file that compute in float, as "OP_TYPE tensor"
    integer_only: bool  # no float tensor anywhere, input and output included (what NPUs and Edge TPUs need)
    input: str
    float_val_accuracy: float
    val_accuracy: float
    val_drop: float  # float minus int8 validation accuracy
    val_lost: float  # share of validation images float gets right and the file wrong: what max_drop bounds
    slowdown: float  # its LiteRT latency over plain int8's, timed as the export times: what max_slowdown bounds
    max_drop: float
    max_slowdown: float | None  # None: no latency budget
    within_budget: bool
    integer_only_asked: bool
    tried: list[dict[str, Any]]  # every candidate measured, in order
    model: bytes = field(repr=False, default=b"")

    def record(self, int8_report: dict[str, Any], float_test_accuracy: float) -> dict[str, Any]:
        """The metadata record: the choice and the file's test-split figures, measured after the choice."""
        record = {key: value for key, value in asdict(self).items() if key != "model"}
        return {
            **record,
            "test_accuracy": int8_report["accuracy"],
            "float_test_accuracy": float_test_accuracy,
            "test_drop": float_test_accuracy - int8_report["accuracy"],
            **{key: int8_report[key] for key in ("size_mb", "latency_median_ms", "latency_p90_ms")},
        }


def choose_int8(model: keras.Model, saved_model: Path, data: Int8Data, export_cfg: Any, latency_cfg: Any,
                plain: Callable[[], bytes] | None = None) -> Int8Choice:
    """Try the recipes in order on the validation split; keep the first within export.int8.max_drop and
    export.int8.max_slowdown (else the one that lost least among those fast enough).

    plain: gives the plain int8 file when the run makes it anyway (its headline latency, `model_files`);
    None converts it here.
    """
    float_predictions = predict_batches(partial(keras_probabilities, model), data.val_images).argmax(-1)
    recipes = candidates(saved_model, data, export_cfg.representative_images, export_cfg.int8.integer_only, plain)
    predict = partial(tflite_predictions, images=data.val_images)
    max_slowdown = export_cfg.int8.max_slowdown
    verdicts = Verdicts(float_predictions, data.val_labels, export_cfg.int8.max_drop,
                        math.inf if max_slowdown is None else max_slowdown)
    return choose(recipes, predict, partial(tflite_latency_ms, latency_cfg=latency_cfg), verdicts,
                  export_cfg.int8.integer_only)


@dataclass
class Verdicts:
    """How a candidate's predictions on the validation split and its latency compare with the budgets."""

    float_predictions: np.ndarray
    labels: np.ndarray
    max_drop: float
    max_slowdown: float = math.inf

    def measure(self, predictions: np.ndarray, latency_ms: float, reference_ms: float) -> dict[str, float]:
        """reference_ms: the latency of the first recipe (plain int8), which the slowdown is relative to."""
        float_right, right = self.float_predictions == self.labels, predictions == self.labels
        return {"val_accuracy": float(np.mean(right)), "val_drop": float(np.mean(float_right) - np.mean(right)),
                "val_lost": float(np.mean(float_right & ~right)), "latency_ms": latency_ms,
                "slowdown": latency_ms / reference_ms}

    def fast_enough(self, measured: dict[str, float]) -> bool:
        return measured["slowdown"] <= self.max_slowdown

    def within(self, measured: dict[str, float]) -> bool:
        lost_within = measured["val_lost"] <= self.max_drop + 1e-9  # a loss of exactly max_drop, whatever the rounding
        return lost_within and self.fast_enough(measured)


def choose(candidates: Iterable[Candidate], predict: Callable[[bytes], np.ndarray], latency_ms: Callable[[bytes], float],
           verdicts: Verdicts, integer_only_asked: bool = False) -> Int8Choice:
    """Measure candidates one by one (a later one is not even converted) until one is within both budgets.

    None within: the one that lost the fewest validation images among those within max_slowdown (plain int8 is).
    """
    tried: list[tuple[Candidate, dict[str, float]]] = []
    for candidate in candidates:
        started = time.perf_counter()
        latency = latency_ms(candidate.model)
        reference = tried[0][1]["latency_ms"] if tried else latency
        tried.append((candidate, verdicts.measure(predict(candidate.model), latency, reference)))
        candidate.seconds += time.perf_counter() - started
        if verdicts.within(tried[-1][1]):
            break
    fast = [pair for pair in tried if verdicts.fast_enough(pair[1])]
    kept, measured = tried[-1] if verdicts.within(tried[-1][1]) else min(fast, key=lambda pair: pair[1]["val_lost"])
    return Int8Choice(
        recipe=kept.recipe,
        calibration_images=kept.calibration_images,
        float_ops=float_ops(kept.model),
        integer_only=is_integer_only(kept.model),
        input=INPUTS[input_type(kept.model)],
        float_val_accuracy=float(np.mean(verdicts.float_predictions == verdicts.labels)),
        **{key: value for key, value in measured.items() if key not in ("latency_ms", "slowdown")},
        slowdown=measured["slowdown"],
        max_drop=verdicts.max_drop,
        max_slowdown=None if math.isinf(verdicts.max_slowdown) else verdicts.max_slowdown,
        within_budget=verdicts.within(measured),
        integer_only_asked=integer_only_asked,
        tried=[_attempt(candidate, measured) for candidate, measured in tried],
        model=kept.model,
    )


def _attempt(candidate: Candidate, measured: dict[str, float]) -> dict[str, Any]:
    return {
        "recipe": candidate.recipe,
        "calibration_images": candidate.calibration_images,
        "float_ops_asked": candidate.float_ops_asked,
        **measured,
        "seconds": round(candidate.seconds, 1),
    }


def candidates(saved_model: Path, data: Int8Data, representative_images: int, integer_only: bool,
               plain: Callable[[], bytes] | None = None) -> Iterator[Candidate]:
    """The recipes' files in order, each converted only when asked for (the previous one was not good enough).

    plain: gives the first recipe's file, calibrated on the first `representative_images` training images
    (None: converted here).
    """
    images = cache(data.training_images)  # loaded once, when a recipe first needs them
    base = min(representative_images, data.training_count)
    yield _timed("int8", base, plain or (lambda: convert_int8(saved_model, images(base))))
    more = min(2 * representative_images, data.training_count)
    calibrated = cache(lambda: calibrate(saved_model, images(more)))  # recipes 2 and 3 quantize this one calibration
    if more > base:
        yield _timed("int8_more_calibration", more, lambda: quantize_except(calibrated(), []))
    if integer_only:
        return
    yield from float_op_candidates(calibrated, images(more)[:DEBUG_IMAGES], more, FLOAT_OPS_KEPT)
    yield _timed("int16x8", more, lambda: convert_int16x8(saved_model, images(more)))


def _timed(recipe: str, calibration_images: int, convert: Callable[[], bytes]) -> Candidate:
    started = time.perf_counter()
    model = convert()
    return Candidate(recipe, model, calibration_images, time.perf_counter() - started)


def full_range_calibration(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The representative dataset: each image as a float32 batch of one, with one black pixel in the first
    image and one white pixel in the last.

    The converter quantizes the uint8 input with the calibrated range of the float input; a range of
    exactly 0..255 gives scale 1 and zero point 0.
    """
    def samples() -> Iterator[list[np.ndarray]]:
        for index, image in enumerate(images):
            sample = image[None].astype("float32")
            if index == 0:
                sample[0, 0, 0] = 0.0
            if index == len(images) - 1:
                sample[0, -1, -1] = 255.0
            yield [sample]

    return samples


def _calibrated_converter(saved_model: Path, calibration: np.ndarray,
                          supported_ops: list[tf.lite.OpsSet]) -> tf.lite.TFLiteConverter:
    """A converter of the SavedModel's `serving_float` endpoint, quantizing with ranges calibrated on these images."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_float"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = full_range_calibration(calibration)
    converter.target_spec.supported_ops = supported_ops
    return converter


def _int8_converter(saved_model: Path, calibration: np.ndarray) -> tf.lite.TFLiteConverter:
    """Full-integer int8 with raw uint8 pixels in and uint8 probabilities out."""
    converter = _calibrated_converter(saved_model, calibration, [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])
    converter.inference_input_type = tf.uint8  # raw pixels go straight in
    converter.inference_output_type = tf.uint8
    return converter


def convert_int8(saved_model: Path, calibration: np.ndarray) -> bytes:
    """Recipes 1 and 2: full-integer int8; ExportError unless its input takes raw pixels."""
    model = _int8_converter(saved_model, calibration).convert()
    check_raw_pixel_input(model)
    return model


def calibrate(saved_model: Path, calibration: np.ndarray) -> bytes:
    """The float TFLite model with every tensor's range recorded on these images, not yet quantized.

    What the converter quantizes for recipes 1 and 2, calibrated once for recipes 2 and 3 (QuantizationDebugger
    asks the converter for it the same way).
    """
    converter = _int8_converter(saved_model, calibration)
    converter._experimental_calibrate_only = True
    return converter.convert()


def float_op_candidates(calibrated: Callable[[], bytes], debug_images: np.ndarray, calibration_images: int,
                        counts: Iterable[int]) -> Iterator[Candidate]:
    """Recipe 3: int8 files with the `count` ops of largest quantization error kept float, for each count."""
    started = time.perf_counter()
    # instrumented as QuantizationDebugger instruments it: each quantized op beside its float twin
    debug_model = tflite_convert.mlir_quantize(calibrated(), enable_numeric_verify=True)
    with warnings.catch_warnings():  # the debugger runs TensorFlow's own (deprecated) tf.lite.Interpreter
        warnings.simplefilter("ignore", UserWarning)
        ranked = rank_ops(debug_model, debug_images)
    ranking_seconds = time.perf_counter() - started
    for count in counts:
        if count > len(ranked):
            return
        started = time.perf_counter()
        model = quantize_except(calibrated(), ranked[:count])
        seconds = time.perf_counter() - started + ranking_seconds
        ranking_seconds = 0.0
        yield Candidate("int8_float_ops", model, calibration_images, seconds, float_ops_asked=ranked[:count])


def rank_ops(debug_model: bytes, images: np.ndarray) -> list[str]:
    """Output tensor names of a debug model's quantized ops, the largest noise-to-signal ratio on these images first."""
    verifier = tf.lite.experimental.QuantizationDebugger(
        quant_debug_model_content=debug_model,
        debug_dataset=lambda: ([image[None].astype("float32")] for image in images),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            layer_direct_compare_metrics={"noise_to_signal": noise_to_signal}),
    )
    verifier.run()
    dump = io.StringIO()
    verifier.layer_statistics_dump(dump)
    ratio = {row["tensor_name"]: float(row["noise_to_signal"]) for row in csv.DictReader(io.StringIO(dump.getvalue()))}
    return sorted(ratio, key=ratio.__getitem__, reverse=True)


def noise_to_signal(float_values: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> float:
    """Power of an op's quantization error over the power of its float output (the same op on the same input)."""
    error = (quantized.astype("float32") - zero_point) * scale - float_values
    return float(np.mean(error**2) / max(float(np.mean(float_values**2)), 1e-12))


def quantize_except(calibrated_model: bytes, float_nodes: list[str]) -> bytes:
    """Quantize a calibrated model as the converter does (uint8 in and out), keeping the named ops in float."""
    model = tflite_convert.mlir_quantize(calibrated_model, input_data_type=tf.uint8, output_data_type=tf.uint8,
                                         denylisted_nodes=float_nodes)
    check_raw_pixel_input(model)
    return model


def convert_int16x8(saved_model: Path, calibration: np.ndarray) -> bytes:
    """Recipe 4: 16-bit activations, 8-bit weights, float32 in and out; an op without a 16x8 kernel stays float."""
    converter = _calibrated_converter(saved_model, calibration, [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,  # hard-swish, for one, has no 16x8 kernel
    ])
    # 16x8 is always quantized by the older quantizer; with the newer one on, the converter first calibrates for
    # it, throws that away and calibrates again (TFLiteConverter._quantize). Off: one pass, the same bytes.
    converter.experimental_new_quantizer = False
    return converter.convert()


def check_raw_pixel_input(model: bytes) -> None:
    """Fail loudly unless a TFLite model's input is uint8 with scale 1 and zero point 0."""
    details = _interpreter(model).get_input_details()[0]
    scale, zero_point = details["quantization"]
    if details["dtype"] != np.uint8 or (scale, zero_point) != RAW_PIXELS:
        raise ExportError(
            f"tflite_int8 input is {np.dtype(details['dtype']).name} with scale {scale:.6g} and zero point "
            f"{zero_point}; raw pixels need uint8 with scale 1 and zero point 0"
        )


def tflite_latency_ms(model: bytes, latency_cfg: Any) -> float:
    """Median batch-1 latency of a TFLite model, timed as the bundle times its files (LiteRT, latency.threads)."""
    with _candidate_file(model) as path:
        return measure_tflite_latency(path, "candidate", latency_cfg.threads, latency_cfg.warmup, latency_cfg.runs).median_ms


def tflite_predictions(model: bytes, images: Images) -> np.ndarray:
    """Top-1 classes of a TFLite model run by LiteRT (a thread per core), fed as `finetune predict` feeds it."""
    with _candidate_file(model) as path:
        return predict_batches(TFLitePredictor(path), images).argmax(-1)


@contextlib.contextmanager
def _candidate_file(model: bytes) -> Iterator[Path]:
    """A TFLite model written to a temporary file (what the file-reading LiteRT tools take), deleted after."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.tflite"
        path.write_bytes(model)
        yield path


def _interpreter(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model)


def input_type(model: bytes) -> str:
    """The dtype name of a TFLite model's input."""
    return np.dtype(_interpreter(model).get_input_details()[0]["dtype"]).name


def is_integer_only(model: bytes) -> bool:
    """Whether no tensor of the model, input and output included, is float32."""
    return all(tensor["dtype"] != np.float32 for tensor in _interpreter(model).get_tensor_details())


def float_ops(model: bytes) -> list[str]:
    """The ops that compute in float ("OP_TYPE tensor"), leaving out the (de)quantize ops between float and integer."""
    interpreter = _interpreter(model)
    dtypes = {tensor["index"]: tensor["dtype"] for tensor in interpreter.get_tensor_details()}
    names = {tensor["index"]: tensor["name"] for tensor in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():  # no public listing of ops; TensorFlow's debugger uses the same
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and any(dtypes.get(i) == np.float32 for i in op["outputs"]):
            found.append(f"{op['op_name']} {names[op['outputs'][0]].split(';')[0]}")
    return found


def summary(record: dict[str, Any]) -> str:
    """One line for the terminal: the recipe kept and what it lost on validation."""
    verdict = "within" if record["within_budget"] else "no recipe tried was within"
    return (f"int8 recipe {record['recipe']} ({len(record['float_ops'])} ops kept float, "
            f"{'integer-only' if record['integer_only'] else 'not integer-only'}): validation accuracy "
            f"{record['val_accuracy']:.4f} against float {record['float_val_accuracy']:.4f}, "
            f"{record['val_lost']:.4f} of the images lost, {record['slowdown']:.2f}x plain int8's latency, {verdict} "
            f"export.int8.max_drop={record['max_drop']}" + _latency_budget(record, " and max_slowdown={}"))


def _latency_budget(record: dict[str, Any], text: str) -> str:
    """`text` with export.int8.max_slowdown in it, or nothing when there is no latency budget."""
    return "" if record["max_slowdown"] is None else text.format(f"{record['max_slowdown']:g}")


def render(record: dict[str, Any]) -> str:
    """The model card's int8 section."""
    speed = _latency_budget(record, " and ran at most {}x as long as plain int8")
    verdict = (f"the first recipe that lost at most {record['max_drop']:.3f} of the validation images{speed}"
               if record["within_budget"] else
               f"no recipe lost at most {record['max_drop']:.3f} of the validation images{speed}: of those "
               f"{'fast enough' if speed else 'tried'}, this one lost the fewest")
    scope = "integer-only recipes only (`export.int8.integer_only=true`)" if record["integer_only_asked"] else "all recipes"
    ops = ", ".join(f"`{op}`" for op in record["float_ops"]) or "none"
    lines = [
        "## TFLite int8: how it was quantized",
        f"- Recipe `{record['recipe']}`, calibrated on {record['calibration_images']} training images: {verdict} "
        f"(tried in order among {scope}, measured on the validation split only).",
        f"- Ops kept in float ({len(record['float_ops'])}): {ops}.",
        f"- Integer-only: {'yes' if record['integer_only'] else 'no (NPUs and Edge TPUs need integer-only models)'}.",
        f"- Input and output: {record['input']}.",
        f"- Latency {record['slowdown']:.2f}x that of plain int8 (recipe `int8`), as timed while choosing.",
        f"- Size {record['size_mb']:.2f} MB, latency median / p90 {record['latency_median_ms']:.2f} / "
        f"{record['latency_p90_ms']:.2f} ms.",
        "",
        "| | validation accuracy | test accuracy |",
        "|---|---|---|",
        f"| float (Keras) | {record['float_val_accuracy']:.4f} | {record['float_test_accuracy']:.4f} |",
        f"| int8 file | {record['val_accuracy']:.4f} | {record['test_accuracy']:.4f} |",
        f"| accuracy loss | {record['val_drop']:+.4f} | {record['test_drop']:+.4f} |",
        f"| images lost (float right, int8 wrong) | {record['val_lost']:.4f} | |",
        "",
        "| recipe tried | calibration images | ops kept float | validation accuracy | accuracy loss | images lost "
        "| latency (ms) | x plain int8 | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['recipe']} | {t['calibration_images']} | {len(t['float_ops_asked'])} | {t['val_accuracy']:.4f} "
        f"| {t['val_drop']:+.4f} | {t['val_lost']:.4f} | {t['latency_ms']:.2f} | {t['slowdown']:.2f} | {t['seconds']:.1f} |"
        for t in record["tried"]
    ]
    return "\n".join(lines) + "\n"
