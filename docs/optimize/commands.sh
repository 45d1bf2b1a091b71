#!/bin/sh
# Each Pareto point of study 'optimize' (r20.pt) as plain resopt commands.
set -e

# trial #5: quantize int8(per_channel=True, calib_method=minmax) on openvino; val 82.50%, 4.08 ms at batch 32, 329.1 kB (best)
resopt export runs/demo/r20.pt --data examples/cifar10-mini --num-verify 64 -o t005.export.onnx
resopt quantize t005.export.onnx --mode int8 --calib-method minmax --calib-data examples/cifar10-mini --num-calib 64 --seed 0 -o t005.quantize.onnx
resopt bench t005.quantize.onnx --runtime openvino --batch-size 32 --data examples/cifar10-mini

# trial #3: quantize int8(per_channel=False, calib_method=minmax) on ort; val 82.50%, 6.59 ms at batch 32, 319.0 kB
resopt export runs/demo/r20.pt --data examples/cifar10-mini --num-verify 64 -o t003.export.onnx
resopt quantize t003.export.onnx --mode int8 --calib-method minmax --per-tensor --calib-data examples/cifar10-mini --num-calib 64 --seed 0 -o t003.quantize.onnx
resopt bench t003.quantize.onnx --runtime ort --batch-size 32 --data examples/cifar10-mini

# trial #0: unchanged on ort; val 83.00%, 13.4 ms at batch 32, 1105.4 kB
resopt export runs/demo/r20.pt --data examples/cifar10-mini --num-verify 64 -o t000.export.onnx
resopt bench t000.export.onnx --runtime ort --batch-size 32 --data examples/cifar10-mini
