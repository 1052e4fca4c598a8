"""Where a run's wall time goes: a per-stage table of one `python -m finetune` run, training and everything else.

Usage:
    python benchmarks/run_profile.py [--out FOLDER] [OVERRIDES ...]
e.g.
    python benchmarks/run_profile.py                                  # the default run on the shared flowers
    python benchmarks/run_profile.py train.phase1.epochs=2 train.phase2.epochs=1   # the same, short training

Default: MobileNetV3Small with the shared weights on the shared 1,101 flowers, every other setting as
`python -m finetune` has it; extra arguments are Hydra overrides. The job runs in this process (as the
Hydra app runs it) with a timer around each stage and the parts of it: the scan, the two phases (split
into training steps, per-epoch validation and the rest of each epoch, which is mostly waiting for the
augmented batches), model.save, the evaluation, the latency timing (SavedModel, conversion, LiteRT and
Keras timing), the MLflow record and model logging, and the export (each format's conversion, the
int8 calibration and recipe choice, the parity and latency measurement of each artifact, MLflow's copy of the bundle).
A part's seconds are included in its stage's, and parts may nest (a conversion inside an int8 recipe's
row is in both); a function that runs in two stages is counted in each. The scan and decoded-image caches
start empty (data.cache_dir in the temporary folder), as on a run's first time over a folder.
After the run, one epoch of the training input alone is timed with and without augmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_RUN = [
    "backbone=mobilenet_v3_small",
    "data=folder",
    f"data.path={SHARED / 'data' / 'flower_photos'}",
    f"backbone.weights={SHARED / 'weights' / 'mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5'}",
]


class Profile:
    """Seconds and calls per (stage, part); `stage` is the run stage being timed at the moment."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.stage = "prepare"  # before the first stage: manifest, scan, split, lists, MLflow run started
        self.epoch_ends: dict[str, float] = {}  # callbacks' on_epoch_end seconds in the current epoch
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def timing(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - start)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[self.stage, part] += seconds
        self.calls[self.stage, part] += 1

    def wrap(self, owner: Any, name: str, part: str | Callable[..., str] | None = None) -> None:
        """Time every call of owner.name (a module's function or a class's method) as `part`
        (a name, or a function of the call's arguments that gives one); a generator's items too."""
        function = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            label = part(*args, **kwargs) if callable(part) else part or name
            with self.timing(label):
                result = function(*args, **kwargs)
            return self._timed_items(label, result) if inspect.isgenerator(result) else result

        setattr(owner, name, timed)

    def _timed_items(self, part: str, generator: Iterator[Any]) -> Iterator[Any]:
        """The generator's items, the time each takes to make added to `part` (not to its calls)."""
        while True:
            start = time.perf_counter()
            try:
                item = next(generator)
            except StopIteration:
                return
            finally:
                self.seconds[self.stage, part] += time.perf_counter() - start
            yield item

    def table(self, total: float) -> str:
        lines = ["| stage | part | calls | seconds | share of the run |", "|---|---|---|---|---|"]
        stages = dict.fromkeys(stage for stage, _ in self.seconds)
        for stage in stages:
            whole = self.seconds.get((stage, "(stage)"), 0.0)
            lines.append(f"| **{stage}** | | | **{whole:.1f}** | {whole / total:.0%} |")
            for (owner, part), seconds in self.seconds.items():
                if owner == stage and part != "(stage)":
                    lines.append(f"| | {part} | {self.calls[owner, part]} | {seconds:.1f} | {seconds / total:.0%} |")
        lines.append(f"| **run** | | | **{total:.1f}** | 100% |")
        return "\n".join(lines)


def epoch_timer(profile: Profile) -> Any:
    """A Keras callback splitting each epoch into training steps, the validation pass and the rest."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch_start, self.steps, self.validation = time.perf_counter(), 0.0, 0.0

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.step_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps += time.perf_counter() - self.step_start

        def on_test_begin(self, logs: Any = None) -> None:
            self.test_start = time.perf_counter()

        def on_test_end(self, logs: Any = None) -> None:
            self.validation += time.perf_counter() - self.test_start

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:  # runs last: the others' epoch ends are timed
            whole = time.perf_counter() - self.epoch_start
            callbacks = {name: profile.epoch_ends.pop(name, 0.0) for name in list(profile.epoch_ends)}
            profile.add("fit: training steps", self.steps)
            profile.add("fit: validation pass", self.validation)
            for name, seconds in callbacks.items():
                profile.add(f"fit: epoch end of {name}", seconds)
            profile.add("fit: the rest (waiting for input batches, Keras)",
                        whole - self.steps - self.validation - sum(callbacks.values()))

    return EpochTimer()


def time_callbacks(profile: Profile, callback_classes: list[type]) -> None:
    """Add the on_epoch_end seconds of these callbacks to the totals the EpochTimer reads at each epoch's end."""
    for callback_class in callback_classes:
        on_epoch_end = callback_class.on_epoch_end

        def timed(callback: Any, *args: Any, _original: Callable = on_epoch_end, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(callback, *args, **kwargs)
            finally:
                name = type(callback).__name__
                profile.epoch_ends[name] = profile.epoch_ends.get(name, 0.0) + time.perf_counter() - start

        callback_class.on_epoch_end = timed


def instrument(profile: Profile) -> None:
    """Put timers around the stages of run._Stages and the expensive calls inside them."""
    import keras

    from finetune import bundle, checkpoints, export, model_files, quantization, run, shipped, tracking, trainer

    run_stage = run._Stages.run

    def timed_stage(stages: Any, stage: str, action: Callable[[], None]) -> None:
        if profile.stage == "prepare":
            profile.add("(stage)", time.perf_counter() - profile.started)
        profile.stage = stage
        with profile.timing("(stage)"):
            run_stage(stages, stage, action)

    run._Stages.run = timed_stage
    fit = keras.Model.fit

    def timed_fit(model: keras.Model, *args: Any, callbacks: list | None = None, **kwargs: Any) -> Any:
        with profile.timing("fit (both phases, each epoch)"):
            return fit(model, *args, callbacks=[*(callbacks or []), epoch_timer(profile)], **kwargs)

    keras.Model.fit = timed_fit
    time_callbacks(profile, [checkpoints.BestCheckpoint, trainer.EpochRecorder, keras.callbacks.BackupAndRestore,
                             keras.callbacks.EarlyStopping])
    for owner, name, part in (
        (run, "prepare_data", "scan and split"),
        (run, "build_classifier", "build the model (weights loaded)"),
        (keras.Model, "save", "model.save (.keras)"),
        (run, "evaluate", "evaluate (val and test)"),
        (run, "save_confusion_matrix", None),
        (run, "save_training_curves", None),
        (model_files, "write_saved_model", "write the SavedModel"),
        (model_files, "convert_tflite", lambda saved_model, fmt, *rest: f"convert {fmt} (tflite_int8: plain)"),
        (shipped, "measure_tflite_latency", "time the headline TFLite file"),
        (shipped, "measure_keras_latency", "time the Keras model"),
        (export, "calibration_images", "load int8 calibration images"),
        (mlflow_module(), "log_artifact", "MLflow log_artifact"),
        (tracking, "log_keras_model", "MLflow log_model"),
        (export, "load_images", "decode the test, validation and calibration images"),
        (quantization, "choose_int8", "choose the int8 recipe (validation split)"),
        (quantization, "_timed", lambda recipe, *rest: f"int8 recipe {recipe}: its file (converted, or the run's)"),
        (quantization, "calibrate", "calibrate once for int8_more_calibration and int8_float_ops"),
        (quantization, "float_op_candidates", "int8_float_ops: rank the ops, quantize each candidate"),
        (quantization, "tflite_predictions", "int8 candidates on the validation split"),
        (quantization, "tflite_latency_ms", "time each int8 candidate"),
        (bundle, "add_metadata", "TFLite metadata"),
        (bundle, "load_predictor", "load each artifact's predictor"),
        (bundle, "measure_artifact", lambda model, bundle_dir, fmt, *rest: f"measure {fmt} (parity, latency)"),
        (bundle, "measure_tflite_latency", "LiteRT timings of the artifacts (in their measure rows)"),
        (bundle, "measure_keras_latency", "Keras timing of the artifact (in its measure row)"),
        (bundle, "write_model_card", None),
        (export, "_log_bundle", "MLflow log of the bundle"),
    ):
        profile.wrap(owner, name, part)


def input_pipeline_seconds(cfg: Any) -> dict[str, float]:
    """One pass over the training input alone, as the run feeds it: the first (decoding into the cache),
    then a cached pass with and without augmentation (random flip, rotation, zoom on the CPU)."""
    import copy

    from finetune.run import prepare_data

    data = prepare_data(cfg)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.data.augment.update(flip=False, rotation=0, zoom=0, mixup=0)
    augmented, plain = data.datasets(cfg)[0], data.datasets(plain_cfg)[0]
    seconds = {"first pass (decode and resize into the cache, augmented)": _one_pass(augmented)}
    seconds["cached pass, augmented"] = _one_pass(augmented)
    _one_pass(plain)
    seconds["cached pass, not augmented"] = _one_pass(plain)
    return seconds


def _one_pass(dataset: Any) -> float:
    start = time.perf_counter()
    for _ in dataset:
        pass
    return time.perf_counter() - start


def mlflow_module() -> Any:
    import mlflow

    return mlflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the run folder here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the default run's")
    args = parser.parse_args()

    started = time.perf_counter()
    from finetune import quiet

    quiet.import_tensorflow()
    from finetune.config import compose, validate
    from finetune.run import run_job

    imported = time.perf_counter() - started
    profile = Profile()
    instrument(profile)
    with tempfile.TemporaryDirectory(prefix="run-profile-") as folder:
        scratch = Path(folder)
        run_dir = Path(args.out) if args.out else scratch / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = compose([*DEFAULT_RUN, f"mlflow.tracking_uri=sqlite:///{scratch / 'mlflow.db'}",
                       f"mlflow.artifact_location={scratch / 'artifacts'}", f"data.cache_dir={scratch / 'cache'}",
                       *args.overrides])
        validate(cfg)
        profile.started = time.perf_counter()
        run_job(cfg, run_dir)
        total = time.perf_counter() - profile.started
        pipeline = input_pipeline_seconds(cfg)
    print(f"\nimport TensorFlow and finetune: {imported:.1f} s (before the run, not in the table)\n")
    print(profile.table(total))
    print("\nThe training input alone, one epoch (measured after the run):")
    for what, seconds in pipeline.items():
        print(f"  {what}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
