"""Phase 2's training step with XLA (jit_compile) off and on, on cached activations and on images, side by side.

Each backbone's classifier is built as a run builds it (the shared weights, input 224, unfreeze_blocks 4), its
top blocks unfrozen as the trainer does (BatchNorm frozen, inference mode), and phase 2's two models compiled
as the trainer compiles them (finetune.trainer's loss, metrics and phase-2 SGD): the top and head on the cached
boundary activations (finetune.feature_cache), and the whole classifier on images. Each model is compiled twice,
jit_compile False and True (two models sharing the same layers), and the four are timed in rounds of
`train_on_batch` on one random batch, the order reversed every round; the figure is the median steps/s over
the rounds. Before timing, a numerics check: from the same weights (dropout off), N steps on the same batches
without and with XLA, comparing the losses and the final weights.

Optional: an op profile of the cached step without XLA (TensorFlow's profiler trace, CPU time summed by op
type), and steps/s of the cached step at larger batches (images/s = steps/s x batch).

Usage:
    python benchmarks/phase2_step.py [--backbones v3_small v2_035] [--rounds 5] [--profile] [--batches 64 128]
    python benchmarks/phase2_step.py --threads 2 1 ...   # TensorFlow intra-/inter-op threads (one run per setting)
    python benchmarks/phase2_step.py --layer-check --backbones   # only one depthwise and one 1x1 conv layer
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resplit import BACKBONES  # noqa: E402

COMMON = ["backbone.input_size=224", "backbone.unfreeze_blocks=4"]
CLASSES, TRAIN_IMAGES = 5, 653  # the shared flowers' re-split: 653 training images (21 steps an epoch at 32)


def phase2_models(overrides: list[str]) -> tuple[Any, dict[str, Any], Any]:
    """The config, phase 2's two models (top on the cache, whole classifier) and the cut (a backbone layer)."""
    from finetune.backbones import BACKBONES as SPECS
    from finetune.config import compose
    from finetune.feature_cache import cut_classifier, phase2_cut
    from finetune.model import build_classifier, freeze_backbone, model_backbone, unfreeze_top_blocks

    cfg = compose([*overrides, *COMMON])
    model = build_classifier(cfg, CLASSES)
    backbone, spec = model_backbone(model), SPECS[cfg.backbone.name]
    cut = phase2_cut(backbone, spec, cfg.backbone.unfreeze_blocks)
    freeze_backbone(backbone)  # as train_two_phases: phase 1 first, then the top blocks unfrozen
    unfreeze_top_blocks(backbone, spec, cfg.backbone.unfreeze_blocks)
    return cfg, {"cache": cut_classifier(model, cut).top, "images": model}, cut


def twin(path: str, models: dict[str, Any], cut: Any) -> Any:
    """A second model over the same layers as `models[path]` (its own compile state and optimizer)."""
    import keras

    from finetune.feature_cache import cut_classifier

    if path == "images":
        return keras.Model(models["images"].inputs, models["images"].outputs, name="classifier_twin")
    return cut_classifier(models["images"], cut).top


def compile_phase2(model: Any, cfg: Any, jit: bool) -> None:
    """The trainer's phase-2 compile (loss, metrics, SGD), then XLA set on or off."""
    from finetune.trainer import _compile, phase2_optimizer

    steps_per_epoch = -(-TRAIN_IMAGES // cfg.data.batch_size)
    _compile(model, phase2_optimizer(cfg.train.phase2, steps_per_epoch), cfg)
    model.jit_compile = jit


def random_batch(model: Any, batch: int, seed: int = 0) -> tuple[Any, Any]:
    """Random inputs of the model's input shape (0..255 images or non-negative activations), one-hot labels."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (batch, *model.input_shape[1:])
    scale = 255.0 if shape[-1] == 3 else 3.0
    inputs = rng.uniform(0, scale, shape).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(CLASSES, size=batch)]
    return tf.constant(inputs), tf.constant(labels)


def steps_per_second(model: Any, data: tuple[Any, Any], steps: int) -> float:
    """Steps/s of `steps` train_on_batch calls (each waits for its loss)."""
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*data)
    return steps / (time.perf_counter() - started)


def check_numerics(cfg: Any, models: dict[str, Any], steps: int) -> None:
    """From the same weights, `steps` steps on the same batches without and with XLA; dropout off (its random
    draws differ under XLA). Prints each path's largest loss and final-weight differences."""
    import keras
    import numpy as np

    classifier = models["images"]
    dropouts = [layer for layer in classifier.layers if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    start = classifier.get_weights()
    for layer in dropouts:
        layer.rate = 0.0
    try:
        for path, model in models.items():
            batches = [random_batch(model, cfg.data.batch_size, seed) for seed in range(steps)]
            runs = {}
            for jit in (False, True):
                classifier.set_weights(start)
                compile_phase2(model, cfg, jit)
                losses = [float(model.train_on_batch(*batch)[0]) for batch in batches]  # [loss, metrics...]
                runs[jit] = (np.array(losses), [w.numpy() for w in model.trainable_weights])
            loss_diff = np.abs(runs[True][0] - runs[False][0])
            weight_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(runs[True][1], runs[False][1]))
            weight_scale = max(float(np.max(np.abs(a))) for a in runs[False][1])
            print(f"  numerics {path}: loss without XLA {runs[False][0][0]:.5f} -> {runs[False][0][-1]:.5f}, "
                  f"with XLA {runs[True][0][0]:.5f} -> {runs[True][0][-1]:.5f}; max |loss diff| over {steps} steps "
                  f"{loss_diff.max():.2e}, max |weight diff| {weight_diff:.2e} (largest weight {weight_scale:.2f})",
                  flush=True)
    finally:
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
        classifier.set_weights(start)


def time_variants(cfg: Any, models: dict[str, Any], cut: Any, rounds: int, steps: dict[str, int],
                  xla: bool) -> dict[tuple[str, bool], float]:
    """Median steps/s of each (path, jit) over the rounds, order reversed every round; jit True only with `xla`."""
    variants = {}
    for path, model in models.items():
        variants[path, False] = model
        if xla:
            variants[path, True] = twin(path, models, cut)
    data = {path: random_batch(model, cfg.data.batch_size) for path, model in models.items()}
    for (path, jit), model in variants.items():
        compile_phase2(model, cfg, jit)
        started = time.perf_counter()
        model.train_on_batch(*data[path])  # trace (and XLA compile)
        first = time.perf_counter() - started
        steps_per_second(model, data[path], 2)
        print(f"  warm-up {path:6s} jit={jit!s:5s}: first step {first:.1f} s", flush=True)
    rates: dict[tuple[str, bool], list[float]] = collections.defaultdict(list)
    order = list(variants)
    for round_index in range(rounds):
        for key in order if round_index % 2 == 0 else order[::-1]:
            rates[key].append(steps_per_second(variants[key], data[key[0]], steps[key[0]]))
        print("  round " + str(round_index + 1) + ": " + ", ".join(
            f"{path}/{'xla' if jit else 'no-xla'} {rates[path, jit][-1]:.2f}" for path, jit in order), flush=True)
    return {key: statistics.median(values) for key, values in rates.items()}


def profile_ops(cfg: Any, model: Any, steps: int, top: int = 12) -> None:
    """CPU time of the cached step without XLA, summed by op type from a TensorFlow profiler trace."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    compile_phase2(model, cfg, False)
    data = random_batch(model, cfg.data.batch_size)
    steps_per_second(model, data, 2)  # traced before the trace starts
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        started = time.perf_counter()
        steps_per_second(model, data, steps)
        wall = time.perf_counter() - started
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(logdir).rglob("*.xplane.pb")).read_bytes())
    by_type: collections.Counter[str] = collections.Counter()
    for plane in space.planes:
        for line in plane.lines if plane.name == "/host:CPU" else []:
            for event in line.events:
                op_type = op_type_of(plane.event_metadata[event.metadata_id].name)
                if op_type:
                    by_type[op_type] += event.duration_ps
    total = sum(by_type.values())
    print(f"  op profile, cached step without XLA, {steps} steps, {wall:.2f} s wall, {total / 1e12:.2f} s of op "
          f"time on all threads ({total / 1e12 / wall:.2f} cores busy):", flush=True)
    for op_type, picoseconds in by_type.most_common(top):
        print(f"    {op_type:40s} {picoseconds / 1e12:7.3f} s  {100 * picoseconds / total:5.1f}%")
    depthwise = sum(ps for op_type, ps in by_type.items() if op_type.startswith("DepthwiseConv2dNativeBackprop"))
    print(f"    depthwise-conv backprop (filter + input): {100 * depthwise / total:.1f}% of op time", flush=True)


def op_type_of(event_name: str) -> str | None:
    """The op type of a profiler event "op_name:OpType" (oneDNN's "_MklNative"/"_Mkl" prefix dropped); None for
    the runtime's own events (ExecutorState::Process, EagerExecute, ...)."""
    name, _, op_type = event_name.rpartition(":")
    if not name or name.endswith(":") or not op_type.isidentifier():
        return None
    return op_type.removeprefix("_MklNative").removeprefix("_Mkl")


def batch_sizes(cfg: Any, models: dict[str, Any], sizes: list[int], rounds: int) -> None:
    """Images/s of the cached step (no XLA) at each batch size, in alternating rounds."""
    model = models["cache"]
    compile_phase2(model, cfg, False)
    data = {size: random_batch(model, size) for size in sizes}
    for size in sizes:
        steps_per_second(model, data[size], 2)  # one trace per shape
    rates: dict[int, list[float]] = collections.defaultdict(list)
    for round_index in range(rounds):
        for size in sizes if round_index % 2 == 0 else sizes[::-1]:
            rates[size].append(size * steps_per_second(model, data[size], max(2, 160 // size)))
    print("  cached step, images/s by batch (no XLA): " + ", ".join(
        f"{size}: {statistics.median(rates[size]):.0f}" for size in sizes), flush=True)


def layer_check(steps: int = 10) -> None:
    """Forward + backward of one V3Small top-block depthwise conv and one 1x1 conv, without and with XLA."""
    import keras
    import tensorflow as tf

    cases = {"depthwise 5x5 on 32x14x14x288": (keras.layers.DepthwiseConv2D(5, padding="same"), (32, 14, 14, 288)),
             "1x1 conv 48->288 on 32x14x14x48": (keras.layers.Conv2D(288, 1), (32, 14, 14, 48))}
    for name, (layer, shape) in cases.items():
        inputs = tf.random.uniform(shape)
        layer.build(shape)
        milliseconds = {}
        for jit in (False, True):
            @tf.function(jit_compile=jit)
            def step(x: tf.Tensor) -> list[tf.Tensor]:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    total = tf.reduce_sum(layer(x) ** 2)
                return tape.gradient(total, [x, *layer.trainable_weights])

            step(inputs)
            started = time.perf_counter()
            for _ in range(steps):
                [gradient.numpy() for gradient in step(inputs)]
            milliseconds[jit] = 1000 * (time.perf_counter() - started) / steps
        print(f"{name}: forward + backward {milliseconds[False]:.1f} ms without XLA, {milliseconds[True]:.1f} ms with "
              f"({milliseconds[True] / milliseconds[False]:.1f}x the time)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="*", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (alternating order)")
    parser.add_argument("--cache-steps", type=int, default=6, help="steps a round on cached activations")
    parser.add_argument("--image-steps", type=int, default=3, help="steps a round on images")
    parser.add_argument("--check-steps", type=int, default=8, help="steps of the numerics check (0: skip)")
    parser.add_argument("--profile", action="store_true", help="op profile of the cached step without XLA")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps traced by --profile")
    parser.add_argument("--batches", type=int, nargs="*", default=[], help="also time the cached step at these batches")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                        help="time (and check) jit_compile=True too; --no-xla: only the steps without XLA")
    parser.add_argument("--layer-check", action="store_true",
                        help="first, one depthwise and one 1x1 conv layer's step without and with XLA")
    parser.add_argument("--threads", type=int, nargs=2, metavar=("INTRA", "INTER"), help="TensorFlow thread pools")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(args.threads[1])
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; threads intra "
          f"{tf.config.threading.get_intra_op_parallelism_threads()} inter "
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0: one per core)", flush=True)
    if args.layer_check:
        layer_check()
    for name in args.backbones:
        keras.utils.set_random_seed(0)
        cfg, models, cut = phase2_models(BACKBONES[name])
        print(f"{name}: cut at {cut.name}, batch {cfg.data.batch_size}", flush=True)
        if args.check_steps and args.xla:
            check_numerics(cfg, models, args.check_steps)
        rates = time_variants(cfg, models, cut, args.rounds, {"cache": args.cache_steps, "images": args.image_steps},
                              args.xla)
        for path in models:
            with_xla = (f", {rates[path, True]:.2f} with ({rates[path, True] / rates[path, False]:.2f}x)"
                        if args.xla else "")
            print(f"  {path:6s}: {rates[path, False]:.2f} steps/s without XLA{with_xla}", flush=True)
        if args.profile:
            profile_ops(cfg, models["cache"], steps=args.profile_steps)
        if args.batches:
            batch_sizes(cfg, models, [cfg.data.batch_size, *args.batches], args.rounds)
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
