#!/usr/bin/env bash
# The main job on the CIFAR-10 subset shipped in the repository (2,000 train / 500 test JPEGs):
# train a ResNet-20, export it to ONNX, quantize it to INT8 and compare all three in one table.
# About 3 minutes on 2 CPU cores; no network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
DATA=examples/cifar10-mini
EPOCHS=${EPOCHS:-15}
mkdir -p "$OUT"
start=$(date +%s)

resopt train --arch resnet20 --data "$DATA" --epochs "$EPOCHS" --batch-size 64 --lr 0.1 -o "$OUT/r20.pt"
resopt export "$OUT/r20.pt" -o "$OUT/r20.onnx" --data "$DATA"
resopt quantize "$OUT/r20.onnx" --mode int8 -o "$OUT/r20.int8.onnx" --data "$DATA"
resopt bench "$OUT/r20.pt" "$OUT/r20.onnx" "$OUT/r20.int8.onnx" --data "$DATA" --batch-size 1,32
resopt info "$OUT/r20.int8.onnx"

echo "demo finished in $(( $(date +%s) - start )) s; artifacts in $OUT/" >&2
