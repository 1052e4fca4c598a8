"""Each TFLite artifact of finished runs' bundles: size, test accuracy, latency at 1 and 2 threads, the int8
recipe, and the MediaPipe Tasks check (loads, class names, top-1 agreement with `finetune predict`).

Usage:
    python benchmarks/export_figures.py RUN_DIR [RUN_DIR ...] [--threads 1 2] [--runs 50]
RUN_DIR is a finished run folder (its `export/` bundle and `data_splits.csv`). The test images are
decoded and resized as finetune does and saved as PNG at the model's input size, so that neither
client resizes; both then see the same pixels. Prints a Markdown table per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision
from PIL import Image

from finetune import predict
from finetune.artifacts import TFLITE_FORMATS, artifact_path
from finetune.cost import measure_tflite_latency
from finetune.dataset import load_images, read_splits
from finetune.sources import source_of


def test_photos(run_dir: Path, size: int, folder: Path) -> tuple[list[Path], np.ndarray]:
    """The run's test images as PNG files at the model's input size, and their labels."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    splits = read_splits(run_dir / "data_splits.csv", source_of(metrics["dataset"]), metrics["classes"])
    paths = []
    for index, image in enumerate(load_images(splits["test"], size)):
        paths.append(folder / f"test_{index:04d}.png")
        Image.fromarray(image.astype("uint8")).save(paths[-1])
    return paths, np.asarray(splits["test"].labels)


def mediapipe_top1(model: Path, files: list[Path], labels: list[str]) -> list[str] | None:
    """MediaPipe Tasks' ImageClassifier (CPU) top-1 class names; None unless every result names every label."""
    base = BaseOptions(model_asset_path=str(model), delegate=BaseOptions.Delegate.CPU)
    with vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(base_options=base)) as classifier:
        results = [classifier.classify(mp.Image.create_from_file(str(path))).classifications[0].categories for path in files]
    named = all(sorted(c.category_name for c in categories) == sorted(labels) for categories in results)
    return [categories[0].category_name for categories in results] if named else None


def figures(run_dir: Path, threads: list[int], warmup: int, runs: int) -> str:
    """One run's table."""
    bundle = run_dir / "export"
    metadata = json.loads((bundle / "metadata.json").read_text())
    labels = (bundle / "labels.txt").read_text().split()
    reports = {report["format"]: report for report in metadata["artifacts"]}
    lines = [f"### {metadata['backbone']['name']} ({run_dir})", "",
             "| artifact | size (MB) | test accuracy | " + " | ".join(f"latency {t} thread(s), ms" for t in threads)
             + " | MediaPipe: loads with class names, top-1 agreement with predict |",
             "|---|---|---|" + "---|" * len(threads) + "---|"]
    with tempfile.TemporaryDirectory() as folder:
        photos, _ = test_photos(run_dir, metadata["input_size"], Path(folder))
        for fmt in (f for f in TFLITE_FORMATS if f in reports):
            path = artifact_path(bundle, fmt)
            latencies = [measure_tflite_latency(path, fmt, t, warmup, runs).median_ms for t in threads]
            ours = [record["predictions"][0]["label"] for record in predict.predict_files(bundle, fmt, photos, top_k=1)]
            theirs = mediapipe_top1(path, photos, labels)
            check = "no class names" if theirs is None else (
                f"yes, {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}")
            lines.append(f"| {path.name} | {reports[fmt]['size_mb']:.2f} | {reports[fmt]['accuracy']:.4f} | "
                         + " | ".join(f"{ms:.2f}" for ms in latencies) + f" | {check} |")
    int8 = metadata.get("int8")
    if int8:
        lines += ["", f"int8 recipe `{int8['recipe']}` ({len(int8['float_ops'])} ops kept float, "
                      f"{'integer-only' if int8['integer_only'] else 'not integer-only'}): validation {int8['val_accuracy']:.4f} "
                      f"vs float {int8['float_val_accuracy']:.4f} ({int8['val_lost']:.4f} of the images lost), test "
                      f"{int8['test_accuracy']:.4f} vs float {int8['float_test_accuracy']:.4f}; tried: "
                      + ", ".join(f"{t['recipe']}({len(t['float_ops_asked'])}) lost {t['val_lost']:.3f}" for t in int8["tried"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timed", type=int, default=50, help="timed calls per latency")
    args = parser.parse_args()
    for run_dir in args.runs:
        print(figures(run_dir, args.threads, args.warmup, args.timed) + "\n")


if __name__ == "__main__":
    main()
