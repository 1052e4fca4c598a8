"""A trained model's files (.keras, SavedModel, TFLite), each made once and shared by the stages that use them.

A run's `time` stage converts the headline format (`latency.format`) and its export converts every format
of the bundle, both through a SavedModel. Made here on first use, in a temporary folder the run keeps until
it ends, the SavedModel is written once, the headline file is converted once and is the file the bundle
ships (for `tflite_int8`: the plain recipe, the int8 chooser's first candidate), and nothing is converted
that the run does not use. A tuner trial makes only its headline file this way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import keras
import numpy as np

from finetune.artifacts import SAVED_MODEL_DIR
from finetune.bundle import convert_tflite, write_saved_model


class ModelFiles:
    """The files of one model, each made the first time it is asked for; `close()` deletes them.

    top_k: the SavedModel's `serve` endpoint's k when the bundle ships the SavedModel; None writes
    `serving_float` alone (all a conversion reads, and quicker). calibration: gives the plain int8
    recipe's calibration images, asked only when tflite_int8 is converted. keras_file: the model's saved
    .keras file when there is one (a run's model.keras), copied rather than saved again.
    """

    def __init__(self, model: keras.Model, top_k: int | None, calibration: Callable[[], np.ndarray],
                 keras_file: Path | None = None) -> None:
        self.model, self.top_k = model, top_k
        self._calibration = calibration
        self._folder = tempfile.TemporaryDirectory(prefix="finetune-model-files-")
        self._keras = keras_file
        self._saved_model: Path | None = None
        self._tflite: dict[str, Path] = {}

    def __enter__(self) -> ModelFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Delete the files made so far (not a keras_file given)."""
        self._folder.cleanup()

    def keras(self) -> Path:
        """The model as a .keras file."""
        if self._keras is None:
            path = Path(self._folder.name) / "model.keras"
            self.model.save(path)
            self._keras = path
        return self._keras

    def saved_model(self) -> Path:
        """The model's SavedModel (with `serve` when top_k is set: as the bundle ships it)."""
        if self._saved_model is None:
            path = Path(self._folder.name) / SAVED_MODEL_DIR
            write_saved_model(self.model, path, self.top_k)
            self._saved_model = path
        return self._saved_model

    def tflite(self, fmt: str) -> Path:
        """The model converted to a TFLite format from the SavedModel, without metadata (tflite_int8: plain int8)."""
        if fmt not in self._tflite:
            path = Path(self._folder.name) / f"{fmt}.tflite"
            representative = self._calibration() if fmt == "tflite_int8" else None
            path.write_bytes(convert_tflite(self.saved_model(), fmt, representative))
            self._tflite[fmt] = path
        return self._tflite[fmt]
