"""Training time and held-out accuracy with and without train.feature_cache, side by side in one run.

For each re-split seed (the pool of `benchmarks/resplit.py`: train + validation images of split seed 0,
the test images never read) and each backbone, the same command runs with `train.feature_cache=false`
and then `=true`. Per run: both phases' wall time (phase 1 includes filling the cache), the cache fill
(K augmented forward passes), and accuracy on the re-split's held-out images; per backbone, the time
ratio and the paired accuracy difference. Runs go one at a time (the ratio needs a quiet machine).

Usage:
    python benchmarks/speed.py [--seeds 1 2 3 4 5] [--backbones v3_small v2_035 v2_100] [--tag NAME] -- OVERRIDES...
Runs: experiments/resplit/speed_<backbone>_<tag>_{images,cached}/seed_<s>/; a finished run is reused.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resplit import BACKBONES, OUT, ROOT, SHARED_FLOWERS, build_pool, run_seed  # noqa: E402

MODES = {"cached": "train.feature_cache=true", "images": "train.feature_cache=false"}


def train_seconds(metrics: dict) -> float:
    """Both phases' wall time (phase 1 includes filling a feature cache)."""
    return metrics["phase1_seconds"] + metrics.get("phase2_seconds", 0.0)


def report(backbone: str, seeds: list[int], runs: dict[tuple[int, str], dict]) -> str:
    """One backbone's table: per seed both modes' time and held-out accuracy, then means and spreads."""
    lines = [f"{backbone}: seed, images s, cached s, ratio, cached phase 1 s, fill s, phase1/fill, "
             "held-out images, cached, difference (points)"]
    ratios, differences = [], []
    for seed in seeds:
        images, cached = runs[seed, "images"], runs[seed, "cached"]
        ratio = train_seconds(images) / train_seconds(cached)
        difference = 100 * (cached["test_accuracy"] - images["test_accuracy"])
        ratios.append(ratio)
        differences.append(difference)
        fill = cached.get("feature_cache_seconds", float("nan"))
        lines.append(f"  {seed:4d}  {train_seconds(images):7.1f}  {train_seconds(cached):7.1f}  {ratio:5.2f}x  "
                     f"{cached['phase1_seconds']:6.1f}  {fill:6.1f}  {cached['phase1_seconds'] / fill:5.2f}  "
                     f"{images['test_accuracy']:.3f}  {cached['test_accuracy']:.3f}  {difference:+5.1f}")
    spread = {mode: statistics.stdev([runs[s, mode]["test_accuracy"] for s in seeds]) if len(seeds) > 1 else 0.0
              for mode in MODES}
    lines.append(f"  mean ratio {statistics.mean(ratios):.2f}x (min {min(ratios):.2f}x); held-out "
                 f"{statistics.mean(runs[s, 'images']['test_accuracy'] for s in seeds):.3f} images, "
                 f"{statistics.mean(runs[s, 'cached']['test_accuracy'] for s in seeds):.3f} cached, mean difference "
                 f"{statistics.mean(differences):+.2f} points; sd over seeds {spread['images']:.3f} images, "
                 f"{spread['cached']:.3f} cached")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_FLOWERS, help="class-per-folder images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=["v3_small", "v2_035"])
    parser.add_argument("--tag", default="default", help="names these settings' runs (change it with the overrides)")
    argv = sys.argv[1:]
    split_at = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split_at]), argv[split_at + 1:]
    pool = build_pool(args.data)
    runs: dict[str, dict[tuple[int, str], dict]] = {backbone: {} for backbone in args.backbones}
    try:
        for seed in args.seeds:
            for backbone in args.backbones:
                for mode, switch in MODES.items():
                    name = f"speed_{backbone}_{args.tag}_{mode}"
                    run_overrides = [*BACKBONES[backbone], *overrides, switch]
                    runs[backbone][seed, mode] = run_seed(name, pool, seed, run_overrides, export=False)
                    print(f"done: {name} seed {seed}", flush=True)
    except subprocess.CalledProcessError as error:
        sys.exit(f"a run failed (exit {error.returncode}); its log is beside its run directory under {OUT}")
    print(f"overrides: {' '.join(overrides) or '(defaults)'}")
    for backbone in args.backbones:
        print(report(backbone, args.seeds, runs[backbone]))


if __name__ == "__main__":
    main()
