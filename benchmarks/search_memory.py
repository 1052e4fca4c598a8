"""Does a search's memory stay flat? The process's RSS after every trial of a small `mode=tune` search.

Usage:
    python benchmarks/search_memory.py [--trials 8] [--quick] [--leak] [--out FOLDER]
e.g.
    python benchmarks/search_memory.py                 # MobileNetV2 alphas 0.35 and 1.0 at 96 px, shared weights
    python benchmarks/search_memory.py --quick         # random weights on tiny synthetic images (~40 s a trial)
    python benchmarks/search_memory.py --leak          # the same without finetune.trial_memory (as on main before)

Real mode: the shared 1,101 flowers, MobileNetV2 with the shared 0.35 file and the 1.0 approximation
(linked under Keras's 96 px file names in a scratch weights_dir), trials of 1 + 1 epochs, no export.
Prints one line per trial (RSS, and the Keras models and TensorFlow function graphs Python still holds)
and the growth per trial (the least-squares slope of RSS over the trials). Run it with and without
--leak to compare; each run is its own process, so neither run's memory colours the other's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
V2_FILES = {  # Keras's 96 px no-top file name -> the shared file (no-top weights do not depend on the input size)
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5":
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5":
        "mobilenet_v2_1.0_224_no_top__dequant_coral_tf2_ptq_int8.h5",
}


def live_objects() -> dict[str, int]:
    """How many Keras models and TensorFlow function graphs (train steps among them) Python still holds."""
    import keras
    from tensorflow.python.framework.func_graph import FuncGraph

    gc.collect()
    objects = gc.get_objects()
    graphs = [obj for obj in objects if isinstance(obj, FuncGraph)]
    return {
        "models": sum(isinstance(obj, keras.Model) for obj in objects),
        "graphs": len(graphs),
        "train_steps": sum(graph.name == "one_step_on_data" for graph in graphs),
    }


def synthetic_images(root: Path, classes: int = 3, per_class: int = 30) -> Path:
    """Small noisy images of one dominant colour per class."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        color = np.eye(3)[label] * 180 + 40
        for index in range(per_class):
            pixels = np.clip(rng.normal(color, 30, (40, 48, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def overrides(args: argparse.Namespace, scratch: Path) -> list[str]:
    common = ["mode=tune", "backbone=mobilenet_v2", "tuner.alpha=[0.35,1.0]", f"tuner.max_trials={args.trials}",
              "tuner.phase1_epochs=1", "tuner.phase2_epochs=1", "train.phase1.epochs=1", "train.phase2.epochs=1",
              "latency.warmup=2", "latency.runs=10", "export.formats=[]", "data=folder",
              f"data.cache_dir={scratch / 'cache'}", f"mlflow.tracking_uri=sqlite:///{scratch / 'mlflow.db'}",
              f"mlflow.artifact_location={scratch / 'artifacts'}"]
    if args.quick:
        return [*common, "backbone.weights=null", "backbone.input_size=32", "data.batch_size=8",
                f"data.path={synthetic_images(scratch / 'images')}"]
    weights = scratch / "weights"
    weights.mkdir()
    for keras_name, shared_name in V2_FILES.items():
        (weights / keras_name).symlink_to(SHARED / "weights" / shared_name)
    return [*common, "backbone.input_size=96", f"weights_dir={weights}", f"data.path={SHARED / 'data' / 'flower_photos'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="random weights, tiny synthetic images")
    parser.add_argument("--leak", action="store_true", help="without finetune.trial_memory's release (as before)")
    parser.add_argument("--out", help="keep the run folder here (default: a temporary folder)")
    args = parser.parse_args()

    from finetune import quiet

    quiet.import_tensorflow()
    from finetune import trial_memory, tuning
    from finetune.config import compose, validate

    rss: list[float] = []
    process = psutil.Process()
    started = time.perf_counter()
    on_trial_end = tuning.TwoPhaseTuner.on_trial_end

    def record_memory(tuner: tuning.TwoPhaseTuner, trial: object) -> None:
        on_trial_end(tuner, trial)
        live = live_objects()
        rss.append(process.memory_info().rss / 1e6)
        print(f"after trial {len(rss)}: RSS {rss[-1]:.0f} MB; live: {live['models']} Keras models, {live['graphs']} "
              f"function graphs ({live['train_steps']} train steps); {time.perf_counter() - started:.0f} s", flush=True)

    tuning.TwoPhaseTuner.on_trial_end = record_memory
    with tempfile.TemporaryDirectory(prefix="search-memory-") as folder:
        scratch = Path(folder)
        run_dir = Path(args.out) if args.out else scratch / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = compose(overrides(args, scratch))
        validate(cfg)
        if args.leak:
            trial_memory.released_training_graphs = contextlib.nullcontext
        tuning.tune_job(cfg, run_dir)
    slope = np.polyfit(np.arange(len(rss)), rss, 1)[0] if len(rss) > 1 else 0.0
    label = "without the release (--leak)" if args.leak else "with the release"
    print(f"\n{label}: RSS after trial 1 {rss[0]:.0f} MB, after trial {len(rss)} {rss[-1]:.0f} MB, "
          f"highest {max(rss):.0f} MB; {slope:+.1f} MB per trial (least-squares slope)", flush=True)


if __name__ == "__main__":
    main()
