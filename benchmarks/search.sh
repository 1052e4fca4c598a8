#!/usr/bin/env bash
# A real accuracy-vs-latency search on the shared flowers with the shared weights, then the report.
# MobileNetV2 alpha 0.35 (Keras's file) and 1.0 (the shared approximation, linked under Keras's file
# name in a scratch weights folder), and MobileNetV3Small 1.0 (dropout only: one alpha has weights).
# Usage: bash benchmarks/search.sh   (results: experiments/runs/search_*, experiments/reports/search_flowers)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd .. && pwd)/shared
weights=$(mktemp -d)
ln -s "$shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5" "$weights/"
ln -s "$shared/weights/mobilenet_v2_1.0_224_no_top__dequant_coral_tf2_ptq_int8.h5" \
    "$weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
common=(mode=tune data.path="$shared/data/flower_photos" mlflow.experiment=search_flowers
        train.phase1.epochs=10 train.phase2.epochs=5 export.formats=[tflite_float32,tflite_int8] "$@")
python -m finetune backbone=mobilenet_v2 weights_dir="$weights" tuner.alpha=[0.35,1.0] tuner.max_trials=4 \
    "${common[@]}" hydra.run.dir=experiments/runs/search_v2
python -m finetune backbone=mobilenet_v3_small tuner.alpha=[1.0] tuner.max_trials=2 \
    backbone.weights="$shared/weights/mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5" \
    "${common[@]}" hydra.run.dir=experiments/runs/search_v3_small
python -m finetune report search_flowers
