"""A large image folder: scan speed (first, cached), peak memory of a one-epoch run, input pipeline vs backbone.

Usage:
    python benchmarks/data_scale.py [--images 100000] [--folder /tmp/data_scale] [--budgets 8 0.5] [--serial-sample 0]
                                    [--rounds 2] [--no-throughput]
e.g.
    python benchmarks/data_scale.py --images 20000
Generates (once) a class-per-folder tree of N JPEGs of 96-256 px in 10 classes plus broken files (cut short,
not an image, a text file), then, side by side in one process:
1. the old serial scan (every file fully decoded one by one in the main process, as `scan_folder` did) against
   the first parallel scan into an empty cache, alternated --rounds times (wall time and this process's CPU time
   per file; the best round of each), and the second scan of the unchanged folder; then the floor of any check
   that gives training's verdicts: TensorFlow's 1/8-scale JPEG decode alone on bytes already in memory, and the
   file reads alone, each in parallel, grouped as the check groups them;
2. the peak RSS of a real one-epoch run at 224 px (`python -m finetune`, MobileNetV3Small, random weights,
   no export) with `data.cache=auto`, at each `--budgets` memory_budget_gb (default 8, the config's);
3. images per second through the classifier (a traced forward pass, batch 32) fed by the folder (read, decode
   and resize every pass, no cache) against the same images already decoded in memory; both through the same
   tf.data batching and prefetch, timed from a fresh iterator to the last prediction, in chunks of the sample
   that alternate which side goes first (a busier moment of the shared machine hits both). Each chunk pays a
   fresh pipeline's start-up, which an epoch pays once: with 256-image chunks (1,024 images) that start-up
   alone showed the folder 1.84x slower on an idle machine, 1.10x with 2,048-image chunks (8,192, the default).
The folder and the caches live under --folder; nothing is written into the project.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
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


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serial_scan_seconds(root: Path, sample: int) -> tuple[float, float, int]:
    """The old scan: each file fully decoded in turn in the main process (on a sample when sample > 0).

    (wall seconds, CPU seconds, files)."""
    from finetune.dataset import class_files
    from finetune.decode_check import file_reason

    files = [path for class_dir in sorted(root.iterdir()) if class_dir.is_dir() for path in class_files(class_dir)]
    if sample:
        files = files[:: max(1, len(files) // sample)]
    start, cpu = time.perf_counter(), cpu_seconds()
    for path in files:
        file_reason(Path(path))
    return time.perf_counter() - start, cpu_seconds() - cpu, len(files)


def parallel_scan_seconds(root: Path, cache_dir: Path) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, usable files, skipped files) of scan_folder."""
    from finetune.dataset import scan_folder

    start, cpu = time.perf_counter(), cpu_seconds()
    folder = scan_folder(root, cache_dir)
    return time.perf_counter() - start, cpu_seconds() - cpu, len(folder.paths), len(folder.skipped)


def check_floor_ms(root: Path, files: int = 20_000) -> dict[str, float]:
    """Wall ms a file, on every core, of what a check with training's verdicts cannot skip (JPEGs only).

    `decode`: TensorFlow's 1/8-scale JPEG decode of bytes already in memory (the Huffman decoding of every
    coefficient that training's verdict needs; `decode_check._decoded_shape`); `read`: reading the files.
    Both grouped CHECK_GROUP to a tf.data element, in parallel, as the check runs them; best of two passes."""
    import tensorflow as tf

    from finetune.decode_check import CHECK_GROUP

    paths = sorted(str(path) for path in root.glob("class_*/[0-9]*.jpg"))[:files]
    contents = tf.data.Dataset.from_tensor_slices(tf.constant([Path(path).read_bytes() for path in paths]))
    names = tf.data.Dataset.from_tensor_slices(tf.constant(paths))

    def grouped(items: tf.data.Dataset, work) -> tf.data.Dataset:
        return items.batch(CHECK_GROUP).map(lambda group: tf.map_fn(work, group, fn_output_signature=tf.int32),
                                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)

    pipelines = {"decode": grouped(contents, lambda data: tf.size(tf.io.decode_jpeg(data, channels=3, ratio=8))),
                 "read": grouped(names, lambda path: tf.strings.length(tf.io.read_file(path)))}
    best = {}
    for name, pipeline in pipelines.items():
        for _ in range(2):
            start = time.perf_counter()
            for _ in pipeline:
                pass
            best[name] = min(best.get(name, np.inf), 1000 * (time.perf_counter() - start) / len(paths))
    return best


def forget_scans(cache_dir: Path) -> None:
    """Empty the scan cache: the next scan is a first one."""
    for stale in (cache_dir / "scan").glob("*.json") if (cache_dir / "scan").exists() else []:
        stale.unlink()


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


def throughput(root: Path, cache_dir: Path, images: int, batch: int = 32, chunks: int = 4) -> dict[str, float]:
    """Images/s through the classifier at 224 px: reading and decoding the files vs the same images in memory.

    Both sides are tf.data pipelines with the same batching and prefetch (only the decode differs), each timed from
    a fresh iterator to the last prediction, chunk by chunk, the side that goes first alternating. (Before, the
    in-memory side was a list of tensors timed in one block and the folder in another: a load change between the
    two blocks on the shared machine showed the folder 1.7x faster than memory.)"""
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
    bounds = np.linspace(0, len(sample.paths), chunks + 1).astype(int)
    pairs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = sample.subset(list(range(start, end)))
        from_files = make_dataset(part, CLASSES, 224, batch, cache=ImageCache("none"))
        decoded = tf.data.Dataset.from_tensor_slices(load_images(part, 224)).batch(batch)
        in_memory = decoded.map(lambda x: tf.cast(x, tf.float32)).prefetch(tf.data.AUTOTUNE)
        pairs.append({"in_memory": in_memory, "from_files": from_files.map(lambda x, y: x)})

    def seconds(images: tf.data.Dataset) -> float:
        start = time.perf_counter()
        for batch_of_images in images:
            forward(batch_of_images).numpy()
        return time.perf_counter() - start

    seconds(pairs[0]["in_memory"].take(2))  # traced before timing
    totals = {"in_memory": 0.0, "from_files": 0.0}
    for index, pair in enumerate(pairs):
        for name in (("in_memory", "from_files") if index % 2 == 0 else ("from_files", "in_memory")):
            totals[name] += seconds(pair[name])
    return {name: len(sample.paths) / total for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--serial-sample", type=int, default=0, help="time the old scan on this many files (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="serial and first parallel scans, alternated")
    parser.add_argument("--no-throughput", action="store_true", help="skip the images/s comparison")
    parser.add_argument("--throughput-images", type=int, default=8192, help="in 4 chunks")
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
    serial_ms, parallel_ms = [], []  # per file: (wall, CPU) of each round
    for round_number in range(1, args.rounds + 1):
        forget_scans(cache_dir)  # each first scan starts from an empty cache
        serial, serial_cpu, serial_files = serial_scan_seconds(root, args.serial_sample)
        first, first_cpu, usable, skipped = parallel_scan_seconds(root, cache_dir)
        files = usable + skipped
        serial_ms.append((1000 * serial / serial_files, 1000 * serial_cpu / serial_files))
        parallel_ms.append((1000 * first / files, 1000 * first_cpu / files))
        print(f"round {round_number}: old serial scan {serial:.1f} s for {serial_files} files "
              f"({serial_ms[-1][0]:.3f} ms/file, CPU {serial_ms[-1][1]:.3f} ms/file); first parallel scan {first:.1f} s "
              f"for {files} ({parallel_ms[-1][0]:.3f} ms/file, CPU {parallel_ms[-1][1]:.3f} ms/file), "
              f"{usable} usable, {skipped} skipped; load {os.getloadavg()[0]:.1f}", flush=True)
    best_serial, best_parallel = min(serial_ms), min(parallel_ms)
    print(f"first scan: {best_serial[0] / best_parallel[0]:.1f}x faster than the old serial scan (best round of each: "
          f"{best_serial[0]:.3f} vs {best_parallel[0]:.3f} ms/file); CPU per file {best_serial[1] / best_parallel[1]:.1f}x"
          f" less ({best_serial[1]:.3f} vs {best_parallel[1]:.3f} ms)")
    second, _, _, _ = parallel_scan_seconds(root, cache_dir)
    print(f"second scan (unchanged files, cache): {second:.2f} s", flush=True)
    floor = check_floor_ms(root)
    print(f"floor of a check with training's verdicts (wall ms a file, every core): 1/8-scale decode of bytes in "
          f"memory {floor['decode']:.3f} + reading the files {floor['read']:.3f} = {sum(floor.values()):.3f}: at most "
          f"{best_serial[0] / sum(floor.values()):.1f}x faster than the old serial scan", flush=True)

    if not args.no_throughput:
        rates = throughput(root, cache_dir, args.throughput_images)
        print(f"classifier at 224 px, batch 32: {rates['in_memory']:.0f} img/s from decoded images in memory, "
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
