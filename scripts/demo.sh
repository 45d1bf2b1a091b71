#!/usr/bin/env bash
# The main job, from a real converged model: import the published CIFAR-10 ResNet-20 shipped in models/
# (akamaster/pytorch_resnet_cifar10, BSD-2-Clause), prune it with fine-tuning (distilled from its own
# parent), export both to ONNX, quantize both to INT8, and compare parent vs pruned vs INT8 vs pruned +
# INT8 in one table on the 500 test JPEGs shipped in examples/, then a short `resopt optimize` search over the
# same steps. No network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
DATA=examples/cifar10-mini
EPOCHS=${EPOCHS:-6}
mkdir -p "$OUT"
start=$(date +%s)

# The file's own preprocessing (ImageNet statistics, 32x32); class names and top-1 come from $DATA.
resopt import models/resnet20-cifar10-akamaster.th --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
  --data "$DATA" -o "$OUT/r20.pt"
# Stage 1 (16 channels) stays whole, stages 2 and 3 lose 25% and 50%; --round-to 8 keeps widths on
# onnxruntime's fast (NCHWc) convolution kernels; the parent teaches the pruned model while it recovers.
resopt prune "$OUT/r20.pt" --layer-ratios 0,0.25,0.5 --round-to 8 --teacher "$OUT/r20.pt" \
  --finetune-epochs "$EPOCHS" --lr 0.02 --batch-size 64 --data "$DATA" -o "$OUT/r20.pruned.pt"
for m in r20 r20.pruned; do
  # No --data: export verifies on the data recorded in the model's lineage ($DATA).
  resopt export "$OUT/$m.pt" -o "$OUT/$m.onnx"
  resopt quantize "$OUT/$m.onnx" --mode int8 -o "$OUT/$m.int8.onnx" --data "$DATA"
done
resopt bench "$OUT/r20.pt" "$OUT/r20.onnx" "$OUT/r20.int8.onnx" "$OUT/r20.pruned.onnx" "$OUT/r20.pruned.int8.onnx" \
  --data "$DATA" --batch-size 1,32 --rounds 2 --min-time 1 --json > "$OUT/bench.json"
resopt info "$OUT/r20.pruned.int8.onnx"
# The table and plots of the whole run (REPORT=docs/demo regenerates the README's images).
resopt report "$OUT" "$OUT/bench.json" -o "${REPORT:-$OUT/report}" \
  --title "make demo: imported ResNet-20, pruned and quantized, on cifar10-mini"

# Last, the search the steps above are one hand-picked point of: `resopt optimize` tries pruning (channels or
# whole blocks, fine-tuned with or without the parent distilling) x quantization x runtime, measured here, and
# keeps the Pareto front (val top-1 vs latency vs size) and the fastest file within 5 val points. A short run:
# 8 trials on 40 images per class; OPT_TRIALS=40 searches longer, and re-running it resumes the same study.
COLUMNS=${COLUMNS:-120} resopt optimize "$OUT/r20.pt" --data "$DATA" --trials "${OPT_TRIALS:-8}" --limit-per-class 40 --prune-ratios 0.25 \
  --blocks 1 --finetune-epochs 2 --quantize none,int8 --calib-methods minmax --batch-size 32 --min-time 0.2 \
  --rounds 2 --max-drop 5 --objective latency -o "${OPT_OUT:-$OUT/optimize}" | tee "$OUT/optimize.txt"
# OPT_DOCS=docs/optimize copies the search's text results there (the README's front), with this folder's path
# taken out: the commands name the model as runs/demo/r20.pt, relative to the repository.
if [[ -n "${OPT_DOCS:-}" ]]; then
  mkdir -p "$OPT_DOCS"
  for f in "$OUT/optimize.txt" "${OPT_OUT:-$OUT/optimize}"/{trials.csv,best.json,commands.sh,report.md}; do
    sed -e "s#$PWD/##g" "$f" > "$OPT_DOCS/$(basename "${f/optimize.txt/front.txt}")"
  done
fi

echo "demo finished in $(( $(date +%s) - start )) s; artifacts in $OUT/" >&2
