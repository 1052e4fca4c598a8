"""Compare training settings on re-splits of train + validation; the test split is never read.

One 165-image validation split cannot separate settings a few points apart, so a candidate default is
run on several re-splits of the train + validation images of `data.split_seed=0` (the test images of
that split are left out of the pool) and judged by the mean over the re-splits.

Usage:
    python benchmarks/resplit.py NAME [--data FOLDER] [--seeds 1 2 3] [--jobs 2] -- OVERRIDES...
e.g.
    python benchmarks/resplit.py v2_defaults -- backbone=mobilenet_v2 backbone.alpha=0.35 weights_dir=../shared/weights
Results: experiments/resplit/NAME/seed_<s>/ (run directories) and a line per setting in
experiments/resplit/results.tsv. A seed whose run already finished is not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune.config import compose
from finetune.dataset import scan_folder, split_folder

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "resplit"
SHARED_FLOWERS = ROOT.parent / "shared" / "data" / "flower_photos"
# metrics.json key -> column; a re-split's "test" images are train + val images of split 0, so: held-out
COLUMNS = {"phase1_best_val_accuracy": "p1_val", "phase2_best_val_accuracy": "p2_val",
           "final_val_accuracy": "final_val", "test_accuracy": "held_out"}


def build_pool(data: Path) -> Path:
    """Link the train + validation images of the default split (seed 0) into a class-per-folder tree."""
    folder, defaults = scan_folder(data), compose(["data=folder", f"data.path={data}"]).data
    splits = split_folder(folder, defaults.val_fraction, defaults.test_fraction, defaults.split_seed)
    pool = OUT / f"pool_{data.name}"
    for split in ("train", "val"):
        for path, label in zip(splits[split].paths, splits[split].labels):
            class_dir = folder.root / folder.class_names[label]
            link = pool / class_dir.name / "__".join(Path(path).relative_to(class_dir).parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(path).resolve())
    return pool


def run_seed(name: str, pool: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    """Train on one re-split (or reuse a finished run) and return its metrics."""
    run_dir = OUT / name / f"seed_{seed}"
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        command = [sys.executable, "-m", "finetune", "data=folder", f"data.path={pool}", f"data.split_seed={seed}",
                   "export.formats=[]", "mlflow.experiment=resplit", f"hydra.run.dir={run_dir}", *overrides]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a name for this setting (its runs go to experiments/resplit/NAME)")
    parser.add_argument("--data", type=Path, default=SHARED_FLOWERS, help="class-per-folder images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    argv = sys.argv[1:]
    split_at = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split_at]), argv[split_at + 1:]  # finetune overrides after --
    pool = build_pool(args.data)
    try:
        with ThreadPoolExecutor(args.jobs) as executor:
            results = list(executor.map(lambda s: run_seed(args.name, pool, s, overrides), args.seeds))
    except subprocess.CalledProcessError as error:
        sys.exit(f"a run failed (exit {error.returncode}); its log is beside its run directory under {OUT / args.name}")
    print(f"{args.name}: " + " ".join(overrides))
    print("seed  " + "  ".join(f"{c:>9s}" for c in COLUMNS.values()))
    for seed, metrics in zip(args.seeds, results):
        print(f"{seed:4d}  " + "  ".join(f"{metrics[c]:9.3f}" for c in COLUMNS))
    means = [statistics.mean(m[c] for m in results) for c in COLUMNS]
    print("mean  " + "  ".join(f"{m:9.3f}" for m in means))
    table_path = OUT / "results.tsv"
    header = "" if table_path.exists() else "\t".join(["name", "seeds", *COLUMNS.values(), "overrides"]) + "\n"
    with open(table_path, "a") as table:
        table.write(header)
        fields = [args.name, ",".join(map(str, args.seeds)), *(f"{m:.3f}" for m in means), " ".join(overrides)]
        table.write("\t".join(fields) + "\n")


if __name__ == "__main__":
    main()
