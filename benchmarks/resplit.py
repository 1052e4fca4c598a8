"""Compare training settings on re-splits of train + validation; the test split is never read.

One 165-image validation split cannot separate settings a few points apart, so a candidate default is
run on several re-splits of the train + validation images of `data.split_seed=0` (the test images of
that split are left out of the pool) and judged by the mean over the re-splits.

Usage:
    python benchmarks/resplit.py NAME [--data FOLDER] [--seeds 1 2 3] [--jobs 2] [--export] -- OVERRIDES...
e.g.
    python benchmarks/resplit.py v2_defaults -- backbone=mobilenet_v2 backbone.alpha=0.35 weights_dir=../shared/weights
Results: experiments/resplit/NAME/seed_<s>/ (run directories) and a line per setting in
experiments/resplit/results.tsv. A seed whose run already finished is not run again.

Runs export nothing (export.formats=[]) unless --export: then the overrides' export.formats (default: all)
are exported, and the float and int8 accuracy on validation and on the held-out images, and the int8 recipe
the export chose on validation, come from each bundle's metadata.json (a line per setting in
experiments/resplit/int8.tsv).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from finetune.config import compose
from finetune.dataset import scan_folder, split_folder

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "resplit"
SHARED_FLOWERS = ROOT.parent / "shared" / "data" / "flower_photos"
WEIGHTS = ROOT.parent / "shared" / "weights"
BACKBONES = {  # with the shared weights; the first two as benchmarks/flowers.sh runs them
    "v3_small": ["backbone=mobilenet_v3_small",
                 f"backbone.weights={WEIGHTS / 'mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5'}"],
    "v2_035": ["backbone=mobilenet_v2", "backbone.alpha=0.35", f"weights_dir={WEIGHTS}"],
    "v2_100": ["backbone=mobilenet_v2",
               f"backbone.weights={WEIGHTS / 'mobilenet_v2_1.0_224_no_top__dequant_coral_tf2_ptq_int8.h5'}"],
}
# metrics.json key -> column; a re-split's "test" images are train + val images of split 0, so: held-out
COLUMNS = {"phase1_best_val_accuracy": "p1_val", "phase2_best_val_accuracy": "p2_val",
           "final_val_accuracy": "final_val", "test_accuracy": "held_out"}
# the bundle's metadata.json `int8` key -> column (with --export)
INT8_COLUMNS = {"float_val_accuracy": "float_val", "val_accuracy": "int8_val", "val_lost": "val_lost",
                "float_test_accuracy": "float_ho", "test_accuracy": "int8_ho", "test_drop": "ho_drop"}


def build_pool(data: Path) -> Path:
    """Link the train + validation images of the default split (seed 0) into a class-per-folder tree."""
    folder, defaults = scan_folder(data), compose(["data=folder", f"data.path={data}"]).data
    splits = split_folder(folder, defaults.val_fraction, defaults.test_fraction, defaults.split_seed)
    pool = OUT / f"pool_{data.name}"
    for split in ("train", "val"):
        for path, label in zip(splits[split].paths, splits[split].labels):
            class_dir = folder.source.root / folder.class_names[label]
            link = pool / class_dir.name / "__".join(Path(path).relative_to(class_dir).parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(path).resolve())
    return pool


def run_seed(name: str, pool: Path, seed: int, overrides: list[str], export: bool) -> dict[str, Any]:
    """Train on one re-split (or reuse a finished run) and return its metrics (and its bundle's metadata)."""
    run_dir = OUT / name / f"seed_{seed}"
    metrics, metadata = run_dir / "metrics.json", run_dir / "export" / "metadata.json"
    if not (metadata if export else metrics).exists():
        command = [sys.executable, "-m", "finetune", "data=folder", f"data.path={pool}", f"data.split_seed={seed}",
                   *([] if export else ["export.formats=[]"]), "mlflow.experiment=resplit", f"hydra.run.dir={run_dir}",
                   *overrides]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    result = json.loads(metrics.read_text())
    if export:
        result["bundle"] = json.loads(metadata.read_text())
    return result


def print_int8(seeds: list[int], results: list[dict[str, Any]]) -> list[float] | None:
    """Per seed: float and int8 accuracy on validation and held-out images, and the recipe; the means."""
    records = [result["bundle"].get("int8") for result in results]
    if not all(records):
        print("(no tflite_int8 in the bundles: no int8 columns)")
        return None
    print("seed  " + "  ".join(f"{c:>9s}" for c in INT8_COLUMNS.values()) + "  int8 recipe (ops kept float; integer-only)")
    for seed, record in zip(seeds, records):
        recipe = f"{record['recipe']} ({len(record['float_ops'])}; {'yes' if record['integer_only'] else 'no'})"
        print(f"{seed:4d}  " + "  ".join(f"{record[c]:9.3f}" for c in INT8_COLUMNS) + f"  {recipe}")
    means = [statistics.mean(record[c] for record in records) for c in INT8_COLUMNS]
    print("mean  " + "  ".join(f"{m:9.3f}" for m in means))
    return means


def append_row(table_path: Path, columns: list[str], fields: list[str]) -> None:
    """One line in a TSV table, under a header written when the table is new."""
    header = "" if table_path.exists() else "\t".join(columns) + "\n"
    with open(table_path, "a") as table:
        table.write(header + "\t".join(fields) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a name for this setting (its runs go to experiments/resplit/NAME)")
    parser.add_argument("--data", type=Path, default=SHARED_FLOWERS, help="class-per-folder images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--export", action="store_true", help="export each run (the overrides' export.formats)")
    argv = sys.argv[1:]
    split_at = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split_at]), argv[split_at + 1:]  # finetune overrides after --
    pool = build_pool(args.data)
    try:
        with ThreadPoolExecutor(args.jobs) as executor:
            results = list(executor.map(lambda s: run_seed(args.name, pool, s, overrides, args.export), args.seeds))
    except subprocess.CalledProcessError as error:
        sys.exit(f"a run failed (exit {error.returncode}); its log is beside its run directory under {OUT / args.name}")
    print(f"{args.name}: " + " ".join(overrides))
    print("seed  " + "  ".join(f"{c:>9s}" for c in COLUMNS.values()))
    for seed, metrics in zip(args.seeds, results):
        print(f"{seed:4d}  " + "  ".join(f"{metrics[c]:9.3f}" for c in COLUMNS))
    means = [statistics.mean(m[c] for m in results) for c in COLUMNS]
    print("mean  " + "  ".join(f"{m:9.3f}" for m in means))
    seeds = ",".join(map(str, args.seeds))
    append_row(OUT / "results.tsv", ["name", "seeds", *COLUMNS.values(), "overrides"],
               [args.name, seeds, *(f"{m:.3f}" for m in means), " ".join(overrides)])
    int8_means = print_int8(args.seeds, results) if args.export else None
    if int8_means is not None:
        append_row(OUT / "int8.tsv", ["name", "seeds", *INT8_COLUMNS.values(), "overrides"],
                   [args.name, seeds, *(f"{m:.3f}" for m in int8_means), " ".join(overrides)])


if __name__ == "__main__":
    main()
