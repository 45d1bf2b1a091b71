#!/usr/bin/env bash
# The README's "Bring your own model" table: import both published CIFAR ResNets of ../shared/models
# (timed without and with top-1 on the full test split), export, quantize to INT8 (top-1 of both on the
# full test split), and bench FP32 vs INT8 on onnxruntime. DATA: an ImageFolder root with train/ and test/
# (default: the unpacked CIFAR-10 JPEGs of `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-import}
DATA=${DATA:-${RESOPT_TEST_CACHE:-.cache/data}/cifar10}
MODELS=${MODELS:-../shared/models}
CLASSES=airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck
NORM=(--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)
mkdir -p "$OUT"
for m in 20 56; do
  src=$(ls "$MODELS"/resnet$m-*.th)
  resopt import "$src" "${NORM[@]}" --classes "$CLASSES" -o "$OUT/r$m.noeval.pt" --json > "$OUT/import$m.noeval.json"
  resopt import "$src" "${NORM[@]}" --data "$DATA" -o "$OUT/r$m.pt" --json > "$OUT/import$m.json"
  resopt export "$OUT/r$m.pt" -o "$OUT/r$m.onnx" --json > "$OUT/export$m.json"
  resopt quantize "$OUT/r$m.onnx" --mode int8 -o "$OUT/r$m.int8.onnx" --data "$DATA" --json > "$OUT/quantize$m.json"
done
resopt bench "$OUT/r20.onnx" "$OUT/r20.int8.onnx" "$OUT/r56.onnx" "$OUT/r56.int8.onnx" --batch-size 1,32 \
  --rounds 3 --min-time 1 --json > "$OUT/bench.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
bench = {m["name"]: m for m in json.load(open(f"{out}/bench.json"))["models"]}
print("| model | import time (no eval / with 10k top-1) | top-1 imported | FP32 ORT top-1 | INT8 top-1 | FP32 b1 / b32 img/s | INT8 b1 / b32 img/s |")
print("|---|--:|--:|--:|--:|--:|--:|")
for m in (20, 56):
    i0 = json.load(open(f"{out}/import{m}.noeval.json"))
    i1 = json.load(open(f"{out}/import{m}.json"))
    q = json.load(open(f"{out}/quantize{m}.json"))
    ips = lambda name: " / ".join(f"{b['throughput_ips']:,.0f}" for b in bench[name]["batches"])
    print(f"| ResNet-{m} | {i0['seconds']:.1f} s / {i1['seconds']:.1f} s | {i1['metrics']['top1']:.2f}% | "
          f"{q['parent']['top1']:.2f}% | {q['result']['top1']:.2f}% | {ips(f'r{m}.onnx')} | {ips(f'r{m}.int8.onnx')} |")
PY
