#!/usr/bin/env bash
# Real runs on the shared 1,101-image flowers subset with the shared ImageNet weights, default schedule.
# Usage: bash benchmarks/flowers.sh [extra overrides...]   (results: experiments/runs/bench_*/)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd .. && pwd)/shared
common=(data.path="$shared/data/flower_photos" mlflow.experiment=benchmarks "$@")
python -m finetune backbone=mobilenet_v3_small \
    backbone.weights="$shared/weights/mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5" \
    "${common[@]}" hydra.run.dir=experiments/runs/bench_v3_small
python -m finetune backbone=mobilenet_v2 backbone.alpha=0.35 weights_dir="$shared/weights" \
    "${common[@]}" hydra.run.dir=experiments/runs/bench_v2_035
