"""A large image folder: scan speed (first, cached), peak memory of a one-epoch run, input pipeline vs backbone.

Usage:
    python benchmarks/data_scale.py [--images 100000] [--folder /tmp/data_scale] [--budgets 8 0.5] [--serial-sample 0]
e.g.
    python benchmarks/data_scale.py --images 20000
Generates (once) a class-per-folder tree of N JPEGs of 96-256 px in 10 classes plus broken files (cut short,
not an image, a text file), then, side by side in one process:
1. today's serial scan (every file decoded one by one in the main process, as `scan_folder` did) against the
   first parallel scan into an empty cache, and the second scan of the unchanged folder;
2. the peak RSS of a real one-epoch run at 224 px (`python -m finetune`, MobileNetV3Small, random weights,
   no export) with `data.cache=auto`, at each `--budgets` memory_budget_gb (default 8, the config's);
3. images per second through the classifier (a traced forward pass, batch 32) fed by the folder (read, decode
   and resize every pass, no cache) against the same images already decoded, as tensors in memory.
The folder and the caches live under --folder; nothing is written into the project.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.image_cache import decoded_bytes

CLASSES = 10
BROKEN = {"cut.jpg": lambda whole: whole[: len(whole) // 2], "garbage.jpg": lambda whole: b"not a jpeg at all",
          "notes.txt": lambda whole: b"a text file among the images"}


def generate(root: Path, count: int, seed: int = 0) -> None:
    """count JPEGs of random sizes (96-256 px a side) in CLASSES folders, plus a few broken files per class."""
    marker = root / f".complete-{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for index in range(count):
        class_dir = root / f"class_{index % CLASSES}"
        class_dir.mkdir(parents=True, exist_ok=True)
        width, height = rng.integers(96, 257, 2)
        coarse = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((int(width), int(height)), Image.BILINEAR).save(class_dir / f"{index:06d}.jpg",
                                                                                       quality=85)
    for label in range(CLASSES):
        buffer = io.BytesIO()
        Image.new("RGB", (160, 120), (label * 20, 90, 160)).save(buffer, "JPEG")
        for name, damage in BROKEN.items():
            (root / f"class_{label}" / f"broken_{name}").write_bytes(damage(buffer.getvalue()))
    marker.touch()


def serial_scan_seconds(root: Path, sample: int) -> tuple[float, int]:
    """Today's scan: each file's decode check in turn in the main process (on a sample when sample > 0)."""
    from finetune.dataset import class_files
    from finetune.decode_check import file_reason

    files = [path for class_dir in sorted(root.iterdir()) if class_dir.is_dir() for path in class_files(class_dir)]
    if sample:
        files = files[:: max(1, len(files) // sample)]
    start = time.perf_counter()
    for path in files:
        file_reason(Path(path))
    return time.perf_counter() - start, len(files)


def parallel_scan_seconds(root: Path, cache_dir: Path) -> tuple[float, int, int]:
    from finetune.dataset import scan_folder

    start = time.perf_counter()
    folder = scan_folder(root, cache_dir)
    return time.perf_counter() - start, len(folder.paths), len(folder.skipped)


PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_peak_rss(root: Path, work: Path, name: str, *overrides: str) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of a real one-epoch run at 224 px, in a fresh process (measured by its parent)."""
    run_dir = work / "runs" / name
    command = [sys.executable, "-m", "finetune", "backbone=mobilenet_v3_small", "backbone.weights=null",
               "backbone.input_size=224", "data=folder", f"data.path={root}", f"data.cache_dir={work / 'cache'}",
               "train.phase1.epochs=1", "train.phase2.epochs=0", "export.formats=[]", "latency.runs=5",
               "latency.warmup=1", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
               f"mlflow.artifact_location={work / 'mlartifacts'}", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak_kb = int(done.stdout.strip().splitlines()[-1].split()[-1])  # Linux reports kB
    return peak_kb / 1e6, seconds


def throughput(root: Path, cache_dir: Path, images: int, batch: int = 32) -> dict[str, float]:
    """Images/s through the classifier at 224 px: reading and decoding the files vs tensors already in memory."""
    import tensorflow as tf
    from omegaconf import OmegaConf

    from finetune.dataset import load_images, make_dataset, scan_folder, split_folder
    from finetune.image_cache import ImageCache
    from finetune.model import build_classifier

    train = split_folder(scan_folder(root, cache_dir), 0.15, 0.15, seed=0)["train"]  # in random order: classes mixed
    sample = train.subset(list(range(min(images, len(train.paths)))))
    model_cfg = OmegaConf.create({
        "backbone": {"name": "mobilenet_v3_small", "alpha": 1.0, "minimalistic": False, "input_size": 224,
                     "unfreeze_blocks": 0, "weights": None},
        "head": {"pooling": "avg", "dropout": 0.2, "hidden_units": [], "class_weight": None},
    })
    model = build_classifier(model_cfg, CLASSES)
    forward = tf.function(lambda images: model(images, training=False))
    from_files = make_dataset(sample, CLASSES, 224, batch, cache=ImageCache("none"))
    decoded = load_images(sample, 224).astype(np.float32)
    in_memory = [tf.constant(decoded[start:start + batch]) for start in range(0, len(decoded), batch)]

    def images_per_second(batches) -> float:
        start = time.perf_counter()
        for images in batches:
            forward(images).numpy()
        return len(sample.paths) / (time.perf_counter() - start)

    images_per_second(in_memory[:2])  # traced before timing
    rates: dict[str, list[float]] = {}
    for _ in range(2):  # alternate, so a busier moment of the shared machine hits both
        rates.setdefault("in_memory", []).append(images_per_second(in_memory))
        rates.setdefault("from_files", []).append(images_per_second(images for images, _ in from_files))
    return {name: max(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--serial-sample", type=int, default=0, help="time today's scan on this many files (0: all)")
    parser.add_argument("--throughput-images", type=int, default=1024)
    parser.add_argument("--budgets", type=float, nargs="*", default=[8.0],
                        help="memory_budget_gb of each one-epoch run (peak RSS); none: no run")
    args = parser.parse_args()
    root, work = args.folder / f"images_{args.images}", args.folder / f"work_{args.images}"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generate(root, args.images)
    print(f"folder: {root} ({args.images} JPEGs + {len(BROKEN) * CLASSES} broken files; "
          f"generated/checked in {time.perf_counter() - start:.0f} s)", flush=True)

    cache_dir = work / "cache"
    for stale in (cache_dir / "scan").glob("*.json") if (cache_dir / "scan").exists() else []:
        stale.unlink()  # the first scan starts from an empty cache
    serial, serial_files = serial_scan_seconds(root, args.serial_sample)
    first, usable, skipped = parallel_scan_seconds(root, cache_dir)
    second, _, _ = parallel_scan_seconds(root, cache_dir)
    files = usable + skipped
    serial_total = serial * files / serial_files
    print(f"serial scan (today): {serial:.1f} s for {serial_files} files = {1000 * serial / serial_files:.2f} ms/file"
          f" -> {serial_total:.0f} s for {files}")
    print(f"first scan (parallel, empty cache): {first:.1f} s = {1000 * first / files:.2f} ms/file; "
          f"{serial_total / first:.1f}x faster; {usable} usable, {skipped} skipped")
    print(f"second scan (unchanged files, cache): {second:.2f} s", flush=True)

    rates = throughput(root, cache_dir, args.throughput_images)
    print(f"classifier at 224 px, batch 32: {rates['in_memory']:.0f} img/s on tensors in memory, "
          f"{rates['from_files']:.0f} img/s reading the folder (decode + resize every pass); "
          f"ratio {rates['in_memory'] / rates['from_files']:.2f}x", flush=True)

    decoded_gb = decoded_bytes(usable, 224) / 1e9
    for budget in args.budgets:
        mode = "memory" if decoded_gb <= budget else "disk"
        peak_gb, seconds = run_peak_rss(root, work, f"budget_{budget}", f"memory_budget_gb={budget}")
        print(f"one-epoch run at 224 px, data.cache=auto, memory_budget_gb={budget} ({decoded_gb:.1f} GB of "
              f"decoded images -> {mode}): peak RSS {peak_gb:.2f} GB, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
