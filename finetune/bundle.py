"""Export bundle: .keras, SavedModel, TFLite float32/float16/dynamic/int8, labels, model card; each measured."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from finetune import quantization
from finetune.artifacts import (
    FLOAT_FORMATS,
    ExportError,
    Images,
    TFLITE_FORMATS,
    TFLitePredictor,
    artifact_path,
    first_image,
    keras_probabilities,
    load_predictor,
    predict_batches,
)
from finetune.bundle_folder import CARD_FILE, LABELS_FILE, METADATA_FILE, building
from finetune.cost import (
    Latency,
    intra_op_threads,
    measure_keras_latency,
    measure_tflite_latency,
    threads_text,
    time_calls,
)
from finetune.tflite_metadata import add_metadata

if TYPE_CHECKING:  # finetune.model_files makes its files with this module's writers
    from finetune.model_files import ModelFiles


@dataclass
class ArtifactReport:
    """What one exported artifact measured on the test split."""

    format: str
    file: str
    size_mb: float
    accuracy: float
    accuracy_delta: float  # minus the Keras model's accuracy
    top1_agreement: float  # share of test images with the same top-1 class as Keras
    max_prob_diff: float  # largest |probability difference| from Keras over the test split
    latency_median_ms: float
    latency_p90_ms: float
    latency_method: str
    threads: int


def write_saved_model(model: keras.Model, path: Path, top_k: int | None) -> None:
    """SavedModel with `serve` (uint8 images of any size -> probabilities, top-k) and `serving_float`.

    top_k None: `serving_float` alone, all a TFLite conversion reads (for MobileNetV3Small 3.5 s to write, not 4.3).
    """
    size = model.input_shape[1:3]

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        resized = tf.image.resize(tf.cast(images, tf.float32), size)  # same bilinear resize as training
        probabilities = model(resized, training=False)
        top = tf.math.top_k(probabilities, k=min(top_k, model.output_shape[-1]))
        return {"probabilities": probabilities, "top_k_indices": top.indices, "top_k_probabilities": top.values}

    archive = keras.export.ExportArchive()
    archive.track(model)
    if top_k is not None:
        archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")])
    archive.add_endpoint(
        "serving_float",
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec((1, *size, 3), tf.float32, name="images")],
    )
    archive.write_out(str(path), verbose=False)


def convert_tflite(saved_model: Path, fmt: str, representative: np.ndarray | None = None) -> bytes:
    """TFLite conversion of the fixed-size float endpoint (through the SavedModel, as Keras 3 needs).

    tflite_int8 here is plain int8 calibrated on the `representative` images; it takes raw pixels, or
    ExportError. (The bundle's int8 file is the recipe `quantization.choose_int8` chose.)
    """
    if fmt == "tflite_int8":
        return quantization.convert_int8(saved_model, representative)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_float"])
    if fmt == "tflite_float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "tflite_dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def export_bundle(
    files: ModelFiles,
    out_dir: Path,
    *,
    class_names: list[str],
    test_images: Images,
    test_labels: np.ndarray,
    int8_data: quantization.Int8Data | None,
    export_cfg: Any,
    latency_cfg: Any,
    metadata: dict[str, Any],
) -> list[ArtifactReport]:
    """Write every requested format of the model into out_dir, measure each on the test split, and check float parity.

    files: the model and its files (`model_files`); the bundle copies them, so a file the run made already
    (its model.keras, the SavedModel and the headline TFLite file of its `time` stage) is not made again.
    test_images: an array, or batches (`dataset.ImageBatches`): each measure reads them one batch at a time.
    The int8 file's recipe is chosen on int8_data's validation split (`quantization`), never on the test split
    (int8_data: None when formats has no tflite_int8).
    The bundle is built in a sibling `.partial` folder and moved into place only when complete (`bundle_folder`).
    """
    model, formats = files.model, list(export_cfg.formats)
    with building(out_dir) as partial:
        if "keras" in formats:
            shutil.copyfile(files.keras(), artifact_path(partial, "keras"))
        if "saved_model" in formats:
            shutil.copytree(files.saved_model(), artifact_path(partial, "saved_model"))
        (partial / LABELS_FILE).write_text("".join(name + "\n" for name in class_names))
        int8 = None
        if "tflite_int8" in formats:
            int8 = quantization.choose_int8(model, files.saved_model(), int8_data, export_cfg, latency_cfg,
                                            plain=lambda: files.tflite("tflite_int8").read_bytes())
        for fmt in (fmt for fmt in formats if fmt in TFLITE_FORMATS):
            path = artifact_path(partial, fmt)
            if fmt == "tflite_int8":
                path.write_bytes(int8.model)
            else:
                shutil.copyfile(files.tflite(fmt), path)
            add_metadata(path, partial / LABELS_FILE, metadata)

        reference = predict_batches(lambda batch: keras_probabilities(model, batch), test_images)
        reports = [
            measure_artifact(model, partial, fmt, test_images, test_labels, reference, export_cfg, latency_cfg)
            for fmt in formats
        ]
        if int8:
            int8_report = asdict(next(r for r in reports if r.format == "tflite_int8"))
            float_test_accuracy = float(np.mean(reference.argmax(-1) == test_labels))
            metadata = {**metadata, "int8": int8.record(int8_report, float_test_accuracy)}
        write_model_card(partial, reports, {**metadata, "classes": class_names, "formats": formats})
    return reports


def measure_artifact(
    model: keras.Model,
    bundle: Path,
    fmt: str,
    images: Images,
    labels: np.ndarray,
    reference: np.ndarray,
    export_cfg: Any,
    latency_cfg: Any,
) -> ArtifactReport:
    """Accuracy, agreement with Keras and batch-1 latency of one artifact; fails loudly on float drift."""
    predictor = load_predictor(bundle, fmt, latency_cfg.threads)
    probabilities = predict_batches(predictor, images)
    predicted = probabilities.argmax(-1)
    max_diff = float(np.max(np.abs(probabilities - reference)))
    tolerance = export_cfg.tolerance.float16 if fmt == "tflite_float16" else export_cfg.tolerance.float32
    if fmt in FLOAT_FORMATS and max_diff > tolerance:
        raise ExportError(f"{fmt} differs from the Keras model by {max_diff:.2e} in probability (tolerance {tolerance:.0e})")
    latency = _artifact_latency(model, bundle, predictor, fmt, first_image(images), latency_cfg)
    path = artifact_path(bundle, fmt)
    size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
    return ArtifactReport(
        format=fmt,
        file=path.name,
        size_mb=size / 1e6,
        accuracy=float(np.mean(predicted == labels)),
        accuracy_delta=float(np.mean(predicted == labels) - np.mean(reference.argmax(-1) == labels)),
        top1_agreement=float(np.mean(predicted == reference.argmax(-1))),
        max_prob_diff=max_diff,
        latency_median_ms=latency.median_ms,
        latency_p90_ms=latency.p90_ms,
        latency_method=latency.method,
        threads=latency.threads,
    )


def _artifact_latency(model: keras.Model, bundle: Path, predictor: Any, fmt: str, image: np.ndarray,
                      latency_cfg: Any) -> Latency:
    warmup, runs = latency_cfg.warmup, latency_cfg.runs
    if fmt == "keras":
        return measure_keras_latency(model, warmup, runs, latency_cfg.keras_threads)
    if isinstance(predictor, TFLitePredictor):
        return measure_tflite_latency(artifact_path(bundle, fmt), fmt, latency_cfg.threads, warmup, runs)
    batch = image[None]
    return time_calls(lambda: predictor(batch), warmup, runs, intra_op_threads(), "SavedModel `serve` signature, uint8 input")


def write_model_card(bundle: Path, reports: list[ArtifactReport], metadata: dict[str, Any]) -> None:
    """metadata.json (machine-readable) and model_card.md (for people)."""
    record = {**metadata, "artifacts": [asdict(report) for report in reports]}
    (bundle / CARD_FILE).write_text(render_card(record))
    (bundle / METADATA_FILE).write_text(json.dumps(record, indent=1, default=str))  # last: marks the bundle complete


def artifact_table(reports: list[dict[str, Any]]) -> str:
    """Markdown table of format, size, accuracy, latency."""
    lines = [
        "| format | file | size (MB) | test accuracy | Δ vs Keras | top-1 agreement | max Δprob "
        "| latency median / p90 (ms) | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['format']} | `{r['file']}` | {r['size_mb']:.2f} | {r['accuracy']:.4f} | {r['accuracy_delta']:+.4f} "
            f"| {r['top1_agreement']:.3f} | {r['max_prob_diff']:.1e} | {r['latency_median_ms']:.2f} / {r['latency_p90_ms']:.2f} "
            f"| {r['threads']} |"
        )
    return "\n".join(lines)


def render_card(record: dict[str, Any]) -> str:
    """The model card in Markdown."""
    int8_section = "\n" + quantization.render(record["int8"]) if "int8" in record else ""
    return f"""# Model card: {record['backbone']['name']} fine-tuned on {record['dataset']['name']}

## Model
- Backbone: `{record['backbone']['name']}` ({', '.join(f'{k} {v}' for k, v in record['backbone'].items() if k != 'name')})
- Input: {record['input_size']}x{record['input_size']} RGB, raw 0..255 pixel values; preprocessing is inside every artifact
  (the SavedModel `serve` signature also resizes any uint8 image itself, bilinear).
- Output: probabilities over {len(record['classes'])} classes, in the order of `labels.txt`: {', '.join(record['classes'])}.
- TFLite int8: {record['int8']['input'] if 'int8' in record else quantization.INPUTS['uint8']}.

## Training
- Dataset: {record['dataset']['name']} at `{record['dataset']['root']}`, split fingerprint `{record['dataset']['fingerprint']}`
  ({record['dataset']['train_images']} train / {record['dataset']['val_images']} val / {record['dataset']['test_images']} test images).
- MLflow run: `{record.get('mlflow_run_id')}`. Full training config: `metadata.json` (`config`).
- Libraries: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.

## Artifacts, measured on the test split
Latency: {latency_paragraph(record['latency'], record['machine'])}

{artifact_table(record['artifacts'])}
{int8_section}"""


def latency_paragraph(latency: dict[str, Any], machine: str) -> str:
    """How the card's latencies were measured, and the run's headline latency when it has one."""
    text = (f"batch 1, {latency['warmup']} warm-up calls then {latency['runs']} timed calls on this machine ({machine}); "
            "TFLite files run by the LiteRT interpreter with XNNPACK, the Keras model and the SavedModel by TensorFlow.")
    headline = latency.get("headline")
    if headline:
        text += (f"\nThe run's headline latency (`latency_median_ms` in MLflow and metrics.json), timed before the export: "
                 f"{headline['median_ms']:.2f} ms median / {headline['p90_ms']:.2f} ms p90, "
                 f"{headline['method']}, {threads_text(headline['threads'])}.")
        if not headline.get("exclusive", True):
            text += f" Other processes kept {headline['other_cores']:.1f} cores busy while it was timed."
    return text

