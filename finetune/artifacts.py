"""Loading and running each exported artifact the same way: uint8 images in, class probabilities out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Union

import numpy as np

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FORMATS = ("tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8")
FORMATS = ("keras", "saved_model", *TFLITE_FORMATS)
FLOAT_FORMATS = ("keras", "saved_model", "tflite_float32", "tflite_float16")  # must agree with Keras
Images = Union[np.ndarray, Iterable[np.ndarray]]  # images in memory, or batches of them (dataset.ImageBatches)


class ExportError(Exception):
    """An exported artifact does not behave like the Keras model it came from."""


def artifact_path(bundle: Path, fmt: str) -> Path:
    """Where a format lives inside a bundle."""
    if fmt == "keras":
        return bundle / KERAS_FILE
    if fmt == "saved_model":
        return bundle / SAVED_MODEL_DIR
    return bundle / f"model_{fmt.removeprefix('tflite_')}.tflite"


class Predictor(Protocol):
    """Probabilities for a batch of uint8 RGB images at the model's input size."""

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class KerasPredictor:
    """A `.keras` file, loaded in Keras's safe mode."""

    def __init__(self, path: Path) -> None:
        import keras

        self.model = keras.saving.load_model(path, safe_mode=True, compile=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(images.astype("float32"), training=False))


class SavedModelPredictor:
    """The SavedModel's `serve` signature: uint8 images of any size, resized inside."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self.serve = tf.saved_model.load(str(path)).signatures["serve"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.serve(images=images.astype("uint8"))["probabilities"].numpy()


class TFLitePredictor:
    """A TFLite model run by the LiteRT interpreter (XNNPACK on CPU), one image at a time."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads or os.cpu_count() or 1
        self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def run_one(self, image: np.ndarray) -> np.ndarray:
        """Probabilities for one HxWx3 uint8 image."""
        batch = image[None].astype("float32")
        if self.input["dtype"] != np.float32:
            batch = quantize(batch, *self.input["quantization"], self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], batch.astype(self.input["dtype"]))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])[0].astype("float32")
        scale, zero_point = self.output["quantization"]
        return (out - zero_point) * scale if self.output["dtype"] != np.float32 else out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.run_one(image) for image in images])


def batches(images: Images) -> Iterable[np.ndarray]:
    """The images batch by batch: an array in memory is one batch."""
    return [images] if isinstance(images, np.ndarray) else images


def predict_batches(predict: Callable[[np.ndarray], np.ndarray], images: Images) -> np.ndarray:
    """predict's outputs for every image, fed one batch at a time (never all the images at once)."""
    return np.concatenate([predict(batch) for batch in batches(images)])


def keras_probabilities(model: Any, images: np.ndarray) -> np.ndarray:
    """A Keras model's probabilities for a batch of uint8 images: the reference every artifact is held to."""
    return np.asarray(model.predict(images.astype("float32"), verbose=0))  # in batches of 32, Keras's default


def first_image(images: Images) -> np.ndarray:
    """The first image (what a batch-1 latency is timed on)."""
    return next(iter(batches(images)))[0]


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype: type) -> np.ndarray:
    """Values in an integer tensor's quantized form, clipped to the dtype's range (never wrapped around)."""
    limits = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), limits.min, limits.max)


def load_predictor(bundle: Path, fmt: str, threads: int | None = None) -> Predictor:
    """The predictor for one format of a bundle."""
    path = artifact_path(bundle, fmt)
    if fmt == "keras":
        return KerasPredictor(path)
    if fmt == "saved_model":
        return SavedModelPredictor(path)
    return TFLitePredictor(path, threads)
