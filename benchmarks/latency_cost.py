"""What timing the shipped file costs per run or tuner trial: SavedModel, conversion, timing; and the Keras figure.

Usage:
    python benchmarks/latency_cost.py [--size 224] [--weights FILE] [--format tflite_float32] [--calibration 500]
        [--repeats 2]
e.g.
    python benchmarks/latency_cost.py --size 32                      # the tests' tiny model, random weights
    python benchmarks/latency_cost.py --weights ../shared/weights/mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5
    python benchmarks/latency_cost.py --weights ... --format tflite_int8 --calibration 500
Builds the default head on MobileNetV3Small, then runs finetune.shipped.shipped_latency as every tuner trial
does (a run that exports makes these files once for its `time` stage and its bundle: finetune.model_files) and
the Keras timing, and prints the seconds each part took.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune import bundle, cost, model_files, shipped
from finetune.dataset import Split, load_images, scan_folder
from finetune.model import build_classifier

SHARED_FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flower_photos"


def timed(seconds: dict[str, float], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """function, adding the seconds each call takes to seconds[name]."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--weights", help="a Keras weights file (default: random weights)")
    parser.add_argument("--format", default="tflite_float32")
    parser.add_argument("--calibration", type=int, default=500, help="int8 calibration images (shared flowers)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model_cfg = OmegaConf.create({
        "backbone": {"name": "mobilenet_v3_small", "alpha": 1.0, "minimalistic": False, "input_size": args.size,
                     "unfreeze_blocks": 0, "weights": args.weights},
        "head": {"pooling": "avg", "dropout": 0.2, "hidden_units": [], "class_weight": None},
    })
    model = build_classifier(model_cfg, 5)
    latency_cfg = OmegaConf.create({"format": args.format, "threads": 1, "keras_threads": None, "warmup": 10, "runs": 50})
    seconds: dict[str, float] = {}
    model_files.write_saved_model = timed(seconds, "SavedModel", bundle.write_saved_model)
    model_files.convert_tflite = timed(seconds, "conversion", bundle.convert_tflite)
    shipped.measure_tflite_latency = timed(seconds, "timing", cost.measure_tflite_latency)
    flowers = scan_folder(SHARED_FLOWERS)
    images = Split(flowers.paths[:args.calibration], flowers.labels[:args.calibration], flowers.source)
    calibration = timed(seconds, "calibration images", lambda: load_images(images, args.size))
    for _ in range(args.repeats):
        seconds.clear()
        start = time.perf_counter()
        with model_files.ModelFiles(model, None, calibration) as files:  # as a tuner trial makes them
            latency = shipped.shipped_latency(files, latency_cfg)
        total = time.perf_counter() - start
        start = time.perf_counter()
        keras_figure = cost.measure_latency(model, 10, 50)
        keras_seconds = time.perf_counter() - start
        parts = ", ".join(f"{name} {value:.1f}" for name, value in seconds.items())
        print(f"{args.size} px {args.format}: shipped file {total:.1f} s ({parts}), {latency.median_ms:.2f} ms median, "
              f"others kept {latency.other_cores:.1f} cores busy; Keras figure {keras_seconds:.1f} s, "
              f"{keras_figure.median_ms:.2f} ms median; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
