"""A 12-trial search end to end, with and without train.feature_cache, side by side in one run.

The search of issue 15's target: `mode=tune backbone=mobilenet_v2 tuner.alpha=[0.35,1.0]`, 12 random
trials over alpha and dropout (the default dropout range and tuner schedule), then the best trial retrained
with the full schedule, tested, timed and exported (the default six formats, as a user gets them), on the
shared 1,101 flowers with the shared MobileNetV2 weights (0.35: Keras's file; 1.0: the shared approximation,
linked under Keras's file name in a scratch weights folder, as benchmarks/search.sh does).

Each side is the real CLI in its own process and its own scratch folder under the system's temporary folder
(data cache, MLflow store, run folder: nothing is written into the project), with the same seed. Per side:
the total wall time, the search (until "Best trial ..."), the retrain and export, each trial's seconds (its
MLflow run), whether it reused a feature cache and a latency figure, and the best trial's val accuracy; then
the ratios. Sides run one after the other; the machine's load average is printed with each.

Usage:
    python benchmarks/search_speed.py [--trials 12] [--sides false true] [--export | --no-export] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FLOWERS = SHARED / "data" / "flower_photos"
V2_FILES = {  # Keras's file name -> the shared file
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5":
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5":
        "mobilenet_v2_1.0_224_no_top__dequant_coral_tf2_ptq_int8.h5",
}
BEST_LINE = "Best trial "  # tuning.tune_job prints it when the search is over and the retrain starts
TRIAL_LINE = re.compile(r"Trial (\S+): val_accuracy")  # TwoPhaseTuner.run_trial's line when a trial is done


@dataclass
class Side:
    """One side's measurements."""

    cache: str
    asked: int  # tuner.max_trials
    total_s: float = 0.0
    search_s: float = 0.0
    trial_ends: dict[str, float] = field(default_factory=dict)  # trial id -> seconds from the start when it ended
    trials: list[dict] = field(default_factory=list)  # per trial: id, seconds, alpha, dropout, reuse tags, val acc
    best_trial: str = "none"
    best_val_accuracy: float = float("nan")
    best_test_accuracy: float = float("nan")
    best_feature_cache_reused: str = "-"  # the retrained best's
    load: str = ""

    @property
    def retrain_s(self) -> float:
        return self.total_s - self.search_s


def load_average() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def weights_folder(scratch: Path) -> Path:
    folder = scratch / "weights"
    folder.mkdir()
    for keras_name, shared_name in V2_FILES.items():
        (folder / keras_name).symlink_to(SHARED / "weights" / shared_name)
    return folder


def overrides(args: argparse.Namespace, cache: str, scratch: Path) -> list[str]:
    chosen = [
        "mode=tune", "backbone=mobilenet_v2", "tuner.alpha=[0.35,1.0]", f"tuner.max_trials={args.trials}",
        f"train.feature_cache={cache}", f"data.path={args.data}", f"weights_dir={weights_folder(scratch)}",
        f"data.cache_dir={scratch / 'data_cache'}", f"mlflow.tracking_uri=sqlite:///{scratch / 'mlflow.db'}",
        f"mlflow.artifact_location={scratch / 'artifacts'}", f"hydra.run.dir={scratch / 'run'}",
    ]
    return chosen if args.export else [*chosen, "export.formats=[]"]


def run_cli(command: list[str], scratch: Path, side: Side) -> None:
    """Run the CLI from scratch, its output (timestamped) into scratch/log.txt and the lines that say how far it
    is onto the terminal; sets the side's total and search seconds and when each trial ended."""
    env = {key: value for key, value in os.environ.items() if key != "FINETUNE_WEIGHTS_DIR"}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    with (scratch / "log.txt").open("w") as log:
        process = subprocess.Popen(command, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            elapsed = time.monotonic() - started
            log.write(f"[{elapsed:7.1f}] {line}")
            if line.startswith(BEST_LINE):
                side.search_s = elapsed
            if ended := TRIAL_LINE.match(line):
                side.trial_ends[ended.group(1)] = elapsed
            if ended or line.startswith((BEST_LINE, "Feature cache:", "Test accuracy")):
                print(f"  [{elapsed:6.0f} s] {line.rstrip()}", flush=True)
        code = process.wait()
    if code != 0:
        sys.exit(f"the search failed (exit {code}); its output: {scratch / 'log.txt'}")
    side.total_s = time.monotonic() - started


def read_mlflow(side: Side, scratch: Path) -> None:
    """Each trial's tags and val accuracy, and the best trial's, from the side's MLflow store; a trial's seconds
    are from the end of the one before (the first trial's from the start: with the scan and the start-up)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{scratch / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("kind", ""), []).append(run)
    previous_end = 0.0
    for run in sorted(by_kind.get("trial", []), key=lambda r: r.info.start_time):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        ended = side.trial_ends.get(tags["trial_id"], float("nan"))
        side.trials.append({
            "id": tags["trial_id"], "seconds": ended - previous_end,
            "alpha": params.get("hp.alpha", "?"), "dropout": round(float(params.get("hp.dropout", "nan")), 3),
            "feature_cache_reused": tags.get("feature_cache_reused", "-"),
            "latency_reused": tags.get("latency_reused", "-"),
            "val_accuracy": metrics.get("final_val_accuracy", float("nan")),
        })
        previous_end = ended
    search = by_kind["search"][0]
    side.best_trial = search.data.tags.get("best_trial", "none")
    side.best_val_accuracy = next((t["val_accuracy"] for t in side.trials if t["id"] == side.best_trial), float("nan"))
    if by_kind.get("best"):
        side.best_test_accuracy = by_kind["best"][0].data.metrics.get("test_accuracy", float("nan"))
        side.best_feature_cache_reused = by_kind["best"][0].data.tags.get("feature_cache_reused", "-")


def run_side(args: argparse.Namespace, cache: str) -> Side:
    scratch = Path(tempfile.mkdtemp(prefix=f"search-speed-cache-{cache}-"))
    side = Side(cache, args.trials, load=load_average())
    print(f"\ntrain.feature_cache={cache}: {args.trials} trials in {scratch} ({side.load})", flush=True)
    command = [sys.executable, "-m", "finetune", *overrides(args, cache, scratch)]
    run_cli(command, scratch, side)
    side.load += f" at the start; {load_average()} at the end"
    read_mlflow(side, scratch)
    if args.keep:
        print(f"  kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return side


def describe(side: Side) -> str:
    lines = [f"train.feature_cache={side.cache} ({side.load})",
             f"  total {side.total_s:.0f} s = search {side.search_s:.0f} s + retrain, test, time and export "
             f"{side.retrain_s:.0f} s",
             "  trial, alpha, dropout, seconds, feature_cache_reused, latency_reused, val accuracy"]
    for trial in side.trials:
        lines.append(f"    {trial['id']:>3}  {trial['alpha']:>4}  {trial['dropout']:.1f}  {trial['seconds']:6.1f}  "
                     f"{trial['feature_cache_reused']:<12}  {trial['latency_reused']:<14}  {trial['val_accuracy']:.3f}")
    seconds = [trial["seconds"] for trial in side.trials]
    if len(seconds) < side.asked:  # 2 alphas x 6 dropouts = 12 combinations in all
        lines.append(f"  {len(seconds)} of the {side.asked} trials asked ran: Keras-Tuner's random oracle stops after "
                     "more than 20 draws in a row of combinations already tried")
    if seconds:
        lines.append(f"  trials: {sum(seconds):.0f} s in all, {sum(seconds) / len(seconds):.1f} s mean, "
                     f"first {seconds[0]:.1f} s, later ones {sum(seconds[1:]) / max(len(seconds) - 1, 1):.1f} s mean")
    lines.append(f"  best trial {side.best_trial}: val accuracy {side.best_val_accuracy:.3f} (short schedule); "
                 f"retrained: test accuracy {side.best_test_accuracy:.3f}, feature_cache_reused "
                 f"{side.best_feature_cache_reused}")
    return "\n".join(lines)


def ratios(uncached: Side, cached: Side) -> str:
    parts = (("end to end", "total_s"), ("search", "search_s"), ("retrain and export", "retrain_s"))
    return "ratios (feature_cache=false / true): " + ", ".join(
        f"{name} {getattr(uncached, key) / getattr(cached, key):.2f}x" for name, key in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--sides", nargs="+", choices=["false", "true"], default=["false", "true"],
                        help="which train.feature_cache values to run, in this order")
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                        help="the best trial's default export (six formats); --no-export: export.formats=[]")
    parser.add_argument("--data", type=Path, default=FLOWERS, help="class-per-folder images")
    parser.add_argument("--keep", action="store_true", help="keep each side's scratch folder (run, log, MLflow)")
    args = parser.parse_args()
    sides = {cache: run_side(args, cache) for cache in args.sides}
    print(f"\n{args.trials}-trial search, MobileNetV2 alpha 0.35/1.0, export {'on' if args.export else 'off'}:")
    for side in sides.values():
        print(describe(side))
    if len(sides) == 2:
        print(ratios(sides["false"], sides["true"]))


if __name__ == "__main__":
    main()
