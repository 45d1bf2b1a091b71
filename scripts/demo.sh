#!/usr/bin/env bash
# The main job on the CIFAR-10 subset shipped in the repository (2,000 train / 500 test JPEGs):
# train a ResNet-20, prune half its channels, export both to ONNX, quantize both to INT8, and compare
# baseline vs pruned vs INT8 vs pruned + INT8 in one table. No network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
DATA=examples/cifar10-mini
EPOCHS=${EPOCHS:-12}
mkdir -p "$OUT"
start=$(date +%s)

resopt train --arch resnet20 --data "$DATA" --epochs "$EPOCHS" --batch-size 64 --lr 0.1 -o "$OUT/r20.pt"
# --round-to 8 keeps pruned widths on onnxruntime's fast (NCHWc) convolution kernels.
resopt prune "$OUT/r20.pt" --method l1-struct --sparsity 0.5 --round-to 8 --finetune-epochs 4 --batch-size 64 \
  --data "$DATA" -o "$OUT/r20.p50.pt"
for m in r20 r20.p50; do
  resopt export "$OUT/$m.pt" -o "$OUT/$m.onnx" --data "$DATA"
  resopt quantize "$OUT/$m.onnx" --mode int8 -o "$OUT/$m.int8.onnx" --data "$DATA"
done
resopt bench "$OUT/r20.pt" "$OUT/r20.onnx" "$OUT/r20.int8.onnx" "$OUT/r20.p50.onnx" "$OUT/r20.p50.int8.onnx" \
  --data "$DATA" --batch-size 1,32 --rounds 2 --min-time 1 --json > "$OUT/bench.json"
resopt info "$OUT/r20.p50.int8.onnx"
# The table and plots of the whole run (REPORT=docs/demo regenerates the README's images).
resopt report "$OUT" "$OUT/bench.json" -o "${REPORT:-$OUT/report}" --title "make demo: ResNet-20 on cifar10-mini"

echo "demo finished in $(( $(date +%s) - start )) s; artifacts in $OUT/" >&2
